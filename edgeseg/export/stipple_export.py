"""STIPPLE's spatial prior into a bundle (`train.scheme: stipple` runs; `edgeseg.train.stipple`).

The network is exported as for a standard run (softmax logits); the prior it was trained with travels beside
it. The files of RUN/stipple/ (prior.json + prior_<k>.npy, reference.json + reference_label.npy) are read once,
each checked against the SHA-256 run.json recorded at training (extra.stipple), parsed (so a bundle never
carries a prior the runtime cannot read) and copied byte for byte into BUNDLE/stipple/. The manifest's
`stipple` section (`edgeseg.runtime.bundle.StipplePrior`, schema version 3) records their hashes and the
placement settings, so the runtime predicts as `edgeseg evaluate RUN` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeseg.errors import UserError
from edgeseg.priors.reference import read_reference
from edgeseg.priors.stipple import read_prior
from edgeseg.runtime.bundle import StipplePrior

BUNDLE_FOLDER = "stipple"


@dataclass(frozen=True)
class PriorFiles:
    """What a STIPPLE bundle adds: the manifest section and the files (bundle name -> bytes)."""

    spec: StipplePrior
    files: dict[str, bytes]


def prior_files(run_dir: Path, record: Mapping[str, Any] | None, settings: Any,
                class_names: Sequence[str]) -> PriorFiles:
    """The run's stored prior as bundle files; `record` is run.json's extra.stipple, `settings` the run's
    `StippleConfig`. UserError when the record is absent or a file is missing or changed since training."""
    if not record:
        raise UserError(f"{run_dir}/run.json records no STIPPLE prior (extra.stipple); was it trained with "
                        "train.scheme stipple?")
    folder = Path(run_dir) / str(record.get("folder", BUNDLE_FOLDER))
    digests = dict(record.get("sha256") or {})
    data: dict[str, bytes] = {}
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"the STIPPLE prior file {path} is missing (run.json lists it)")
        content = path.read_bytes()
        if hashlib.sha256(content).hexdigest() != digest:
            raise UserError(f"{path} changed since training (sha256 differs from run.json); it cannot be exported")
        data[name] = content

    def read(name: str) -> bytes:
        if name not in data:
            raise UserError(f"{folder / name}: the prior needs it but run.json records no sha256 for it")
        return data[name]

    prior, reference = read_prior(read, str(folder)), read_reference(read, str(folder))
    if list(prior.class_names) != list(class_names):
        raise UserError(f"the STIPPLE prior in {folder} is for classes {list(prior.class_names)}, the run's model "
                        f"for {list(class_names)}")
    files = {f"{BUNDLE_FOLDER}/{name}": content for name, content in data.items()}
    spec = StipplePrior(folder=BUNDLE_FOLDER, files={f"{BUNDLE_FOLDER}/{n}": d for n, d in digests.items()},
                        class_names=list(prior.class_names), reference_case=reference.name, num_bins=prior.num_bins,
                        boxes={o.name: list(o.box) for o in prior.organs}, eps=float(settings.eps),
                        max_shift=int(settings.max_shift), factors=[int(f) for f in settings.factors],
                        reference_smoothing=float(settings.reference_smoothing))
    return PriorFiles(spec, files)
