"""The shared data modules (and the keypoint decoding and STIPPLE prior the runtime uses) must import without
torch: the device runtime has none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import edgeseg.data.io, edgeseg.data.preprocess, edgeseg.data.discovery, edgeseg.data.phantoms\n"
        "import edgeseg.data.metadata, edgeseg.data.modalities, edgeseg.data.heatmaps\n"
        "import edgeseg.metrics.keypoints, edgeseg.runtime.keypoints\n"
        "import edgeseg.priors.predict, edgeseg.priors.stipple, edgeseg.priors.reference, edgeseg.priors.placement\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'brevitas'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"torch-free modules loaded: {result.stdout.strip()[:200]}"
