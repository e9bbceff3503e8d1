import pytest
import torch

from edgeseg.errors import UserError
from edgeseg.nets import create_model
from edgeseg.train.checkpoint import load_training_state, load_weights, save_training_state, save_weights
from edgeseg.train.optim import build_scheduler


def _model():
    torch.manual_seed(0)
    return create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, depth=1, base_width=4)


def _step(model, opt, sched):
    x = torch.randn(2, 1, 8, 8)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    sched.step()


def test_training_state_round_trip_continues_identically(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_scheduler(opt, "poly", total_steps=10)
    _step(model, opt, sched)
    save_training_state(tmp_path / "last.safetensors", model, opt, sched, {"epoch": 3, "note": "x"})
    _step(model, opt, sched)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = _model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = build_scheduler(opt2, "poly", total_steps=10)
    state = load_training_state(tmp_path / "last.safetensors", model2, opt2, sched2)
    assert state == {"epoch": 3, "note": "x"}
    _step(model2, opt2, sched2)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)


def test_weights_only_file_has_no_pickle_and_loads(tmp_path):
    model = _model()
    save_weights(tmp_path / "w.safetensors", model, {"val_dice": 0.5})
    data = (tmp_path / "w.safetensors").read_bytes()
    assert b"\x80\x04" not in data[:16]  # not a pickle stream
    other = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, depth=1, base_width=4)
    assert load_weights(tmp_path / "w.safetensors", other) == {"val_dice": 0.5}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_or_mismatched_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_weights(bad, _model())
    save_weights(tmp_path / "w.safetensors", _model())
    wider = create_model("unet", spatial_dims=2, in_channels=1, out_channels=3, depth=1, base_width=4)
    with pytest.raises(Exception):
        load_weights(tmp_path / "w.safetensors", wider)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_weights(tmp_path / "nope.safetensors", wider)


def test_resume_housekeeping_removes_orphaned_checkpoint_temporaries_and_half_written_log_lines(tmp_path):
    from edgeseg.train.rundir import RunDir

    run = RunDir(tmp_path)
    run.last.parent.mkdir(parents=True)
    run.last.write_bytes(b"whole")
    # ours (edgeseg.atomic) and safetensors' own: a SIGKILL in CI once left checkpoints/.tmpuot1Om behind
    orphans = [run.last.parent / ".last.safetensors.abc123.safetensors", run.last.parent / ".best.safetensors.x",
               run.last.parent / ".tmpuot1Om"]
    for path in orphans:
        path.write_bytes(b"partial")
    keep = [run.last.parent / "notes.txt", run.last.parent / ".tmp-user-notes"]
    for path in keep:
        path.write_text("user file")
    assert sorted(run.remove_orphaned_temporaries()) == sorted(p.name for p in orphans)
    assert not any(p.exists() for p in orphans) and all(p.is_file() for p in keep)
    assert run.last.read_bytes() == b"whole"
    run.log.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.4}\n{"epoch": 3, "lo')
    run.truncate_log(after_epoch=2)
    assert run.log.read_text() == '{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.4}\n'
