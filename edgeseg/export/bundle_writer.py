"""Write a bundle (directory or `.zip`) atomically, with the SHA-256 and size of every file in the manifest.

Torch-free: used by `edgeseg export` and by `edgeseg bundle` (third-party ONNX models).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

from edgeseg.atomic import atomic_path, json_safe
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import MANIFEST, FileEntry, Manifest, is_archive, safe_member_name, sha256_hex


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(json_safe(manifest.to_dict()), indent=2, allow_nan=False) + "\n").encode("utf-8")


def write_bundle(out: Path, files: dict[str, bytes], manifest: Manifest, *, overwrite: bool = False) -> Manifest:
    """Write `files` and `manifest` (its `files` and sizes.bundle_bytes filled in here) to `out`.

    `out` ending in `.zip` gives a single-file archive, anything else a directory. An existing
    `out` is replaced only with `overwrite`; a crash never leaves a half-written bundle at `out`.
    """
    out = Path(out)
    for name in files:
        safe_member_name(name, "bundle writer")
    entries = {name: FileEntry(sha256=sha256_hex(data), bytes=len(data)) for name, data in files.items()}
    sizes = dict(manifest.sizes)
    sizes["bundle_bytes"] = sum(e.bytes for e in entries.values())
    final = replace(manifest, files=entries, sizes=sizes)
    Manifest.from_dict(final.to_dict(), "manifest being written")  # never write what the loader would refuse
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    if is_archive(out):
        _write_zip(out, files, final)
    else:
        _write_dir(out, files, final)
    return final


def _write_zip(out: Path, files: dict[str, bytes], manifest: Manifest) -> None:
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, _manifest_bytes(manifest))
        for name, data in files.items():
            archive.writestr(name, data)


def _write_dir(out: Path, files: dict[str, bytes], manifest: Manifest) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (staging / MANIFEST).write_bytes(_manifest_bytes(manifest))
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out.exists():
            if not out.is_dir():
                raise UserError(f"{out} exists and is not a bundle directory")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
