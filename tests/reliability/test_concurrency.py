"""Two `edgeseg segment` processes writing into one folder at the same time never corrupt each other's files.

Every output is written to a temporary name and renamed into place (`edgeseg.atomic`), so a reader
(or the other writer) only ever sees a complete file. Oracle: the masks one process writes alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def segment(bundle: Path, inputs: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeseg", "segment", str(bundle), str(inputs), "--out", str(out),
                             "--overwrite", "--backend", "onnxruntime", "--threads", "1", "--probabilities"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every image file (the run summary holds timings, so it differs from run to run)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.suffix != ".json"}


def test_two_runs_into_one_folder_leave_complete_identical_files(kit, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(kit.dataset / "images", inputs)
    shared = tmp_path / "shared"
    # two writers into `shared`, and the oracle writing alone into its own folder, all at once
    first, second = segment(kit.bundle, inputs, shared), segment(kit.bundle, inputs, shared)
    alone = segment(kit.bundle, inputs, tmp_path / "alone")
    for process in (first, second, alone):
        assert process.wait(timeout=120) == 0, process.stderr.read()
        assert "Traceback" not in process.stderr.read()
    assert digest(shared) == digest(tmp_path / "alone")  # same names, same bytes: no torn or mixed file
    for path in shared.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())  # the run summary (edgeseg.runtime.batch) is whole too
            continue
        data = np.asarray(nib.load(str(path)).dataobj)  # every file reads back whole
        assert data.size > 0
    assert not [p for p in shared.iterdir() if p.name.startswith(".")]  # no temporary left
