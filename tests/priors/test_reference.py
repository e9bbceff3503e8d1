"""Placing STIPPLE's prior on a volume (edgeseg.priors.reference): the reference volume, own alignment of labelled
volumes, translation of unlabelled ones, storage. Oracles: centres and medoids worked out by hand, shifts built in."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.priors.reference import (
    Reference,
    centres_from_label,
    centres_from_probabilities,
    choose_reference,
    load_reference,
    save_reference,
)


def _label(shape, boxes) -> np.ndarray:
    """A label with class k filling each box (start, stop) given as {k: (start, stop)}."""
    label = np.zeros(shape, np.uint8)
    for k, (start, stop) in boxes.items():
        label[tuple(slice(a, b) for a, b in zip(start, stop))] = k
    return label


def test_reference_is_the_medoid_of_the_organ_centres():
    shape = (12, 12, 12)
    # organ 1 centres (x only varies): volume a at x=2, b at x=4, c at x=9 (bounding-box centres, rounded down)
    a = _label(shape, {1: ((1, 5, 5), (4, 7, 7))})   # x 1..3 -> centre 2
    b = _label(shape, {1: ((3, 5, 5), (6, 7, 7))})   # x 3..5 -> centre 4
    c = _label(shape, {1: ((8, 5, 5), (11, 7, 7))})  # x 8..10 -> centre 9
    # summed distances: a 2 + 7 = 9, b 2 + 5 = 7, c 7 + 5 = 12 -> b
    ref = choose_reference(["a", "b", "c"], [a, b, c], 2)
    assert ref.name == "b" and ref.centres() == {1: (4, 5, 5)}
    empty = np.zeros(shape, np.uint8)
    assert choose_reference(["e", "a"], [empty, a], 2).name == "a"  # volumes lacking a class never serve
    with pytest.raises(UserError, match="holds every class"):
        choose_reference(["e"], [empty], 2)


def test_labelled_volume_uses_its_own_centres_and_places_an_absent_organ_by_translation():
    ref_label = _label((16, 16, 16), {1: ((2, 2, 2), (5, 5, 5)), 2: ((9, 9, 9), (12, 12, 12))})
    ref = Reference("ref", ref_label, 3)
    assert ref.centres() == {1: (3, 3, 3), 2: (10, 10, 10)}
    # both organs present, not where the reference has them: own centres, whatever the reference says
    own = _label((16, 16, 16), {1: ((6, 1, 2), (9, 4, 5)), 2: ((1, 10, 10), (4, 13, 13))})
    assert centres_from_label(own, ref, max_shift=4) == {1: (7, 2, 3), 2: (2, 11, 11)}
    # organ 2 missing: the label's organ 1 is the reference's moved by (2, 1, -1), so organ 2 goes to (12, 11, 9)
    partial = _label((16, 16, 16), {1: ((4, 3, 1), (7, 6, 4))})
    assert centres_from_label(partial, ref, max_shift=4) == {1: (5, 4, 2), 2: (12, 11, 9)}


def test_unlabelled_volume_is_placed_by_the_shift_of_its_probabilities():
    ref = Reference("ref", _label((16, 16, 16), {1: ((3, 4, 5), (7, 8, 8))}), 2)  # centre (4, 5, 6)
    # network probabilities on a larger volume: an unsure copy of the organ (p = 0.9 on it, 0.1 elsewhere)
    # moved by (5, -2, 3)
    moved = _label((20, 18, 16), {1: ((8, 2, 8), (12, 6, 11))})
    fg = np.where(moved == 1, 0.9, 0.1)
    probs = np.stack([1 - fg, fg])
    centres, shift = centres_from_probabilities(probs, ref, max_shift=6, factors=(2, 1))
    assert shift == (5, -2, 3)
    assert centres == {1: (9, 3, 9)}
    # against the bare one-hot label the pure background shifted in from outside the volume wins: each real
    # background voxel costs 0.1 ln(0.1 / eps) + 0.9 ln 0.9 = 1.06, so the search pushes the volume away
    _, unsmoothed = centres_from_probabilities(probs, ref, max_shift=6, factors=(2, 1), smoothing=0.0)
    assert unsmoothed != (5, -2, 3)


def test_reference_round_trip_and_damage(tmp_path):
    ref = Reference("case_7", _label((5, 6, 7), {1: ((1, 1, 1), (3, 3, 3))}), 2)
    save_reference(ref, tmp_path)
    loaded = load_reference(tmp_path)
    assert loaded.name == "case_7" and loaded.num_classes == 2 and loaded.label.dtype == np.uint8
    np.testing.assert_array_equal(loaded.label, ref.label)
    (tmp_path / "reference_label.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="cannot read the STIPPLE reference"):
        load_reference(tmp_path)


def test_import_is_torch_free():
    import subprocess
    import sys

    code = "import sys, edgeseg.priors.reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
