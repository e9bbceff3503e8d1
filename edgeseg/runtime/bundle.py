"""The model bundle: ONNX model forms + `manifest.json`, as a directory or a single `.zip` file.

Torch-free (numpy + onnxruntime; no `onnx` package needed, see `onnx_wire`). The schema is
documented in docs/bundle.md. Loading verifies, before anything is used:

- the manifest parses and its schema version is one this edgeseg reads;
- every file the manifest lists exists, has the listed size and SHA-256, and has a safe
  relative name (no absolute paths, no `..`);
- every model form names a listed file, and the shapes/names it declares are consistent;
- a STIPPLE bundle's prior files (manifest `stipple`) are listed with the same SHA-256, parse, and have the
  shapes, classes and reference the section records (`Bundle.stipple_prior`).

A bundle that fails any check is refused with one `UserError` line naming the file or field.
Nothing is unpickled anywhere: the manifest is JSON, models are ONNX protobuf, weights raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeseg import __version__
from edgeseg.errors import UserError
from edgeseg.runtime.onnx_wire import WireError, inline_model

FORMAT = "edgeseg-bundle"
SCHEMA_VERSION = 3  # the newest version this edgeseg reads (and writes, for bundles that need it)
BASE_SCHEMA_VERSION = 1  # what bundles without extra model inputs are written as, so older edgeseg still reads them
EXTRA_INPUTS_SCHEMA_VERSION = 2  # version 2 added `metadata` and `modalities` (extra graph inputs)
STIPPLE_SCHEMA_VERSION = 3  # version 3 added `stipple`: an older edgeseg would ignore the prior, so it must refuse
MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".zip"
BACKENDS = ("onnxruntime", "tensorrt", "any")
PRECISIONS = ("fp32", "fp16", "int8")
OUTPUT_KINDS = ("logits", "probabilities", "sigmoid", "normalized_relu", "sigmoid_multilabel", "heatmap")
# "sigmoid": one logit channel of a binary model (ivadomed's and many MONAI models' output), read as
# class_names [background, foreground] with p(foreground) = sigmoid(logit).
# "normalized_relu": one raw score channel per class of a SoftSeg model (Gros et al. 2021); the runtime
# turns each tile sample into soft maps: relu(s) / max relu(s), then divided by the channel sum at each
# voxel; a 2-class model is read as ivadomed's one-channel binary model, f = relu(s1 - s0) / max, served as
# (1 - f, f) (`pipeline.normalized_relu`, as ivadomed computes it).
# "sigmoid_multilabel": one logit channel per class name of an INERRANT model (Petit et al. 2021): channels
# 1..K are independent sigmoids, channel 0 is not used. The runtime serves [MULTILABEL_BACKGROUND,
# sigmoid(s_1), ..., sigmoid(s_K)], whose argmax is INERRANT's rule: the class of maximum probability,
# background when every class probability is below 0.5 (`pipeline.sigmoid_multilabel`).
# "heatmap": one logit channel per class name of a keypoint model (train.scheme keypoints, Count-ception): channels
# 1..K are sigmoid heatmaps, channel 0 is not used (served as 0). `edgeseg segment` writes the heatmaps and the
# decoded keypoints (`edgeseg.runtime.keypoints`), decoding as the manifest's `keypoints` section says.
MULTILABEL_BACKGROUND = float(np.nextafter(np.float32(0.5), np.float32(0.0)))  # the largest float32 below 0.5


@dataclass(frozen=True)
class McSite:
    """One Monte Carlo dropout site exported as a mask input.

    The runtime feeds `input` a float32 mask of shape (N, channels, 1, ..., 1) (one 1 per spatial
    axis) holding 0 (channel dropped) or 1 / (1 - p) (kept, rescaled): channel dropout exactly as
    torch's dropout2d/dropout3d draws it, but with the randomness under the runtime's control so
    that ONNX Runtime and TensorRT give different samples per pass and reproducible ones per seed.
    """

    input: str
    channels: int
    p: float


@dataclass(frozen=True)
class MetadataInput:
    """FiLM's per-case metadata input (schema version 2): `input` (B, len(fields)) float32.

    The runtime reads each case's raw values by field name (a JSON sidecar `<case stem>.json` beside the
    image, a table, or `--metadata`) and feeds (raw - mean) / std per field, the normalisation training
    fitted on its training split (`edgeseg.data.metadata.MetadataNormalization`; method "none": mean 0,
    std 1). `table` / `case_column`: the run's metadata table when it lay under the data root (relative
    path; what `edgeseg evaluate BUNDLE --data` reads), else None (sidecars).
    """

    input: str
    fields: list[str]
    method: str
    mean: list[float]
    std: list[float]
    table: str | None = None
    case_column: str = "case"

    def normalization(self) -> Any:
        """The training-time normalisation (edgeseg.data.metadata.MetadataNormalization, numpy only)."""
        from edgeseg.data.metadata import MetadataNormalization

        return MetadataNormalization(tuple(self.fields), self.method, tuple(self.mean), tuple(self.std))


@dataclass(frozen=True)
class ModalityInput:
    """HeMIS's modality-mask input (schema version 2): `input` (B, len(names)) float32, 1 where the
    modality (image channel `i` = names[i]) is present, 0 where it is missing (its channel zero-filled)."""

    input: str
    names: list[str]


@dataclass(frozen=True)
class StipplePrior:
    """STIPPLE's spatial prior (schema version 3; Petit et al. 2021, `edgeseg.priors`), copied from the run's
    RUN/stipple/ into the bundle folder `folder`: prior.json with one prior_<k>.npy per organ, reference.json
    with reference_label.npy. `files`: bundle file name -> SHA-256, as run.json recorded them at training (each
    also listed in the manifest's `files`). The runtime places the prior on each volume's softmax probabilities
    by the KL-minimising translation within +-`max_shift` voxels, searched over the pooling `factors`, onto the
    reference volume's label smoothed by `reference_smoothing`; floors it at `eps`; and predicts the argmax of
    q_k p_k / sum_c q_c p_c (`edgeseg.priors.predict.PriorModel`, what `edgeseg evaluate RUN` runs too)."""

    folder: str
    files: dict[str, str]
    class_names: list[str]  # the prior's class order (= the manifest's class_names)
    reference_case: str  # the training volume whose label places the prior
    num_bins: int
    boxes: dict[str, list[int]]  # organ name -> prior box (W_p, H_p, dz)
    eps: float
    max_shift: int
    factors: list[int]
    reference_smoothing: float


@dataclass(frozen=True)
class ModelForm:
    """One runnable ONNX graph of the model."""

    file: str
    backend: str  # "onnxruntime", "tensorrt" or "any"
    precision: str  # what the convolutions run in: "fp32" or "int8"
    mc: bool = False  # takes MC dropout mask inputs (manifest.mc_sites)
    packed_int4: bool = False  # holds INT4 initializers; expanded to INT8 at load
    opset: int = 17  # default-domain opset of the graph as loaded (at rest: 21 when packed)
    ir_version: int = 8
    inputs: list[str] = field(default_factory=lambda: ["image"])
    session_config: dict[str, str] = field(default_factory=dict)  # onnxruntime session config entries


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to feed the model and read its output (docs/bundle.md)."""

    spatial_dims: int
    in_channels: int
    class_names: list[str]
    tile_size: list[int]  # default inference tile (the training patch unless --tile)
    min_input_multiple: int  # every spatial size fed to the model must be a multiple of this
    preprocess: dict[str, Any]  # edgeseg.data.preprocess.PreprocessSpec.to_dict()
    forms: dict[str, ModelForm]
    files: dict[str, FileEntry]
    input_name: str = "image"
    output_name: str = "logits"
    output_kind: str = "logits"  # "logits" (softmax), "probabilities", "sigmoid" (binary, 1 channel), "normalized_relu",
    # "sigmoid_multilabel" (see OUTPUT_KINDS)

    def model_channels(self) -> int:
        """Channels the model outputs: one per class, or one for a binary sigmoid model."""
        return 1 if self.output_kind == "sigmoid" else len(self.class_names)
    batch: int = 1  # batch of the TensorRT optimisation profile; ONNX Runtime forms take any batch
    slice_axis: int | None = None  # 2D models on 3D volumes: the sliced axis
    training: dict[str, Any] = field(default_factory=dict)  # patch_size, spacing, orientation
    bits: dict[str, Any] = field(default_factory=dict)  # nominal and deployed bit widths
    mc_sites: list[McSite] = field(default_factory=list)
    sizes: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    metadata: MetadataInput | None = None  # FiLM: per-case metadata input (schema version 2)
    modalities: ModalityInput | None = None  # HeMIS: modality-mask input (schema version 2)
    # output_kind "heatmap": how to decode keypoints {radius_mm, threshold, max_per_class} (+ sigma_mm, match_mm
    # as trained); None = the defaults of edgeseg.data.heatmaps.KeypointDecoding
    keypoints: dict[str, Any] | None = None
    stipple: StipplePrior | None = None  # STIPPLE runs: the spatial prior the runtime places (schema version 3)
    schema_version: int = BASE_SCHEMA_VERSION
    edgeseg_version: str = __version__
    format: str = FORMAT

    @property
    def mc_available(self) -> bool:
        return bool(self.mc_sites) and any(f.mc for f in self.forms.values())

    @property
    def extra_inputs(self) -> list[str]:
        """Graph inputs besides the image and the MC masks, in graph order: metadata, then the modality mask."""
        return [spec.input for spec in (self.metadata, self.modalities) if spec is not None]

    def extra_input_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shape of each extra input for a batch of `batch` tiles (one row per tile, the case's values)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.metadata is not None:
            shapes[self.metadata.input] = (batch, len(self.metadata.fields))
        if self.modalities is not None:
            shapes[self.modalities.input] = (batch, len(self.modalities.names))
        return shapes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Keep the identifying fields first for people reading the file.
        head = {k: data.pop(k) for k in ("format", "schema_version", "edgeseg_version")}
        data["mc_dropout"] = {"available": self.mc_available, "sites": data.pop("mc_sites")}
        for key in ("metadata", "modalities", "keypoints", "stipple"):  # schema version 1 bundles stay as they were
            if data[key] is None:
                del data[key]
        return {**head, **data}

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> Manifest:
        """Validate and build; any problem is a UserError naming `source` and the field."""
        return _parse_manifest(data, source)

    def form(self, name: str) -> ModelForm:
        if name not in self.forms:
            from edgeseg.errors import unknown_name

            raise unknown_name("model form", name, self.forms)
        return self.forms[name]

    def pick_form(self, backend: str, mc: bool = False) -> str:
        """The form to run on `backend` ("onnxruntime" or "tensorrt"), with or without MC masks."""
        if backend not in ("onnxruntime", "tensorrt"):
            raise UserError(f"backend must be onnxruntime or tensorrt, got {backend!r}")
        candidates = [n for n, f in self.forms.items() if f.mc == mc and f.backend == backend]
        candidates += [n for n, f in self.forms.items() if f.mc == mc and f.backend == "any"]
        if not candidates:
            what = "Monte Carlo dropout" if mc else "plain inference"
            raise UserError(f"this bundle has no {backend} form for {what} (forms: {', '.join(self.forms)})")
        return candidates[0]

    def mc_mask_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shape of each MC mask input for a batch of `batch` tiles."""
        return {s.input: (batch, s.channels) + (1,) * self.spatial_dims for s in self.mc_sites}


# ------------------------------------------------------------------------------------- validation


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise UserError(f"{source}: missing field '{key}'")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise UserError(f"{source}: field '{key}' must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise UserError(f"{source}: field '{key}' must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _int_list(data: Mapping[str, Any], key: str, source: str) -> list[int]:
    value = _get(data, key, list, source)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise UserError(f"{source}: field '{key}' must be a list of positive integers, got {value!r}")
    return list(value)


def safe_member_name(name: str, source: str) -> str:
    """A bundle file name: relative, forward slashes, no `..` (the loader never leaves the bundle)."""
    path = PurePosixPath(name)
    if (not name or "\\" in name or path.is_absolute() or any(part in ("..", "") for part in name.split("/"))
            or name == MANIFEST):
        raise UserError(f"{source}: unsafe or reserved file name {name!r} in the bundle")
    return name


def _parse_form(name: str, data: Any, source: str) -> ModelForm:
    where = f"{source}: forms.{name}"
    if not isinstance(data, dict):
        raise UserError(f"{where} must be an object")
    backend = _get(data, "backend", str, where)
    precision = _get(data, "precision", str, where)
    if backend not in BACKENDS:
        raise UserError(f"{where}.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise UserError(f"{where}.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    inputs = _get(data, "inputs", list, where, ["image"])
    if not inputs or not all(isinstance(i, str) and i for i in inputs):
        raise UserError(f"{where}.inputs must be a non-empty list of input names")
    config = _get(data, "session_config", dict, where, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
        raise UserError(f"{where}.session_config must map strings to strings")
    return ModelForm(
        file=safe_member_name(_get(data, "file", str, where), where),
        backend=backend,
        precision=precision,
        mc=_get(data, "mc", bool, where, False),
        packed_int4=_get(data, "packed_int4", bool, where, False),
        opset=_get(data, "opset", int, where, 17),
        ir_version=_get(data, "ir_version", int, where, 8),
        inputs=list(inputs),
        session_config=dict(config),
    )


def _parse_manifest(data: Any, source: str) -> Manifest:
    if not isinstance(data, dict):
        raise UserError(f"{source}: not a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise UserError(f"{source}: not an edgeseg bundle manifest (format {fmt!r}, expected {FORMAT!r})")
    version = _get(data, "schema_version", int, source)
    if version > SCHEMA_VERSION:
        raise UserError(f"{source}: bundle schema version {version} is newer than this edgeseg "
                        f"({__version__}) reads (<= {SCHEMA_VERSION}); upgrade edgeseg")
    if version < 1:
        raise UserError(f"{source}: invalid schema_version {version}")
    spatial_dims = _get(data, "spatial_dims", int, source)
    if spatial_dims not in (2, 3):
        raise UserError(f"{source}: spatial_dims must be 2 or 3, got {spatial_dims}")
    in_channels = _get(data, "in_channels", int, source)
    if in_channels < 1:
        raise UserError(f"{source}: in_channels must be >= 1, got {in_channels}")
    class_names = _get(data, "class_names", list, source)
    if not class_names or not all(isinstance(c, str) and c for c in class_names):
        raise UserError(f"{source}: class_names must be a non-empty list of names")
    tile = _int_list(data, "tile_size", source)
    if len(tile) != spatial_dims:
        raise UserError(f"{source}: tile_size {tile} needs {spatial_dims} values (spatial_dims)")
    multiple = _get(data, "min_input_multiple", int, source)
    if multiple < 1 or any(t % multiple for t in tile):
        raise UserError(f"{source}: tile_size {tile} must be multiples of min_input_multiple {multiple}")
    batch = _get(data, "batch", int, source, 1)
    if batch < 1:
        raise UserError(f"{source}: batch must be >= 1, got {batch}")
    output_kind = _get(data, "output_kind", str, source, "logits")
    if output_kind not in OUTPUT_KINDS:
        raise UserError(f"{source}: output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}")
    if output_kind == "sigmoid" and len(data.get("class_names") or []) != 2:
        raise UserError(f"{source}: output_kind 'sigmoid' is for binary models: class_names needs exactly "
                        f"[background, foreground]")
    slice_axis = _get(data, "slice_axis", (int, type(None)), source, None)

    files_raw = _get(data, "files", dict, source)
    files: dict[str, FileEntry] = {}
    for name, entry in files_raw.items():
        safe_member_name(name, f"{source}: files")
        if not isinstance(entry, dict):
            raise UserError(f"{source}: files.{name} must be an object with sha256 and bytes")
        digest = _get(entry, "sha256", str, f"{source}: files.{name}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise UserError(f"{source}: files.{name}.sha256 is not a lowercase hex SHA-256")
        files[name] = FileEntry(sha256=digest, bytes=_get(entry, "bytes", int, f"{source}: files.{name}"))

    forms_raw = _get(data, "forms", dict, source)
    if not forms_raw:
        raise UserError(f"{source}: the bundle has no model forms")
    forms = {name: _parse_form(name, f, source) for name, f in forms_raw.items()}
    for name, form in forms.items():
        if form.file not in files:
            raise UserError(f"{source}: forms.{name}.file {form.file!r} is not listed in files")

    mc = _get(data, "mc_dropout", dict, source, {"available": False, "sites": []})
    sites_raw = _get(mc, "sites", list, f"{source}: mc_dropout", [])
    sites = []
    for i, site in enumerate(sites_raw):
        where = f"{source}: mc_dropout.sites[{i}]"
        if not isinstance(site, dict):
            raise UserError(f"{where} must be an object")
        p = _get(site, "p", (int, float), where)
        if not 0 < p < 1:
            raise UserError(f"{where}.p must be within (0, 1), got {p}")
        channels = _get(site, "channels", int, where)
        if channels < 1:
            raise UserError(f"{where}.channels must be >= 1")
        sites.append(McSite(input=_get(site, "input", str, where), channels=channels, p=float(p)))
    input_name = _get(data, "input_name", str, source, "image")
    metadata = _parse_metadata(data, source, version)
    modalities = _parse_modalities(data, source, version, in_channels)
    extra = [spec.input for spec in (metadata, modalities) if spec is not None]
    site_names = [s.input for s in sites]
    names = [input_name, *extra, *site_names]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: graph input names {names} must be distinct (input_name, metadata.input, "
                        "modalities.input, mc_dropout.sites)")
    for name, form in forms.items():
        if form.mc and not sites:
            raise UserError(f"{source}: forms.{name} takes MC dropout masks but mc_dropout.sites is empty")
        expected = [input_name] + extra + (site_names if form.mc else [])
        if form.inputs != expected:
            what = "model input" + (f", extra inputs {extra}" if extra else "")
            raise UserError(f"{source}: forms.{name}.inputs {form.inputs} do not match the {what} "
                            f"and MC mask inputs {expected}")
    preprocess = _get(data, "preprocess", dict, source)
    _check_preprocess(preprocess, source)
    if slice_axis is not None and not 0 <= slice_axis <= 2:
        raise UserError(f"{source}: slice_axis must be 0, 1, 2 or null, got {slice_axis}")
    return Manifest(
        spatial_dims=spatial_dims, in_channels=in_channels, class_names=list(class_names), tile_size=tile,
        min_input_multiple=multiple, preprocess=dict(preprocess), forms=forms, files=files,
        input_name=input_name, output_name=_get(data, "output_name", str, source, "logits"),
        output_kind=output_kind, batch=batch, slice_axis=slice_axis,
        training=dict(_get(data, "training", dict, source, {})), bits=dict(_get(data, "bits", dict, source, {})),
        mc_sites=sites, sizes=dict(_get(data, "sizes", dict, source, {})),
        parity=dict(_get(data, "parity", dict, source, {})), source=dict(_get(data, "source", dict, source, {})),
        metadata=metadata, modalities=modalities, keypoints=_parse_keypoints(data, source, output_kind),
        stipple=_parse_stipple(data, source, version, files, spatial_dims, list(class_names), output_kind),
        schema_version=version, edgeseg_version=_get(data, "edgeseg_version", str, source), format=FORMAT,
    )


def _extra_section(data: Mapping[str, Any], key: str, source: str, version: int) -> dict[str, Any] | None:
    """The manifest's `key` object (None when absent or null); extra inputs need schema version 2."""
    section = _get(data, key, (dict, type(None)), source, None)
    if section is not None and version < EXTRA_INPUTS_SCHEMA_VERSION:
        raise UserError(f"{source}: field '{key}' (an extra model input) needs schema_version "
                        f"{EXTRA_INPUTS_SCHEMA_VERSION}, the manifest says {version}")
    return section


def _names(section: Mapping[str, Any], key: str, where: str) -> list[str]:
    names = _get(section, key, list, where)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise UserError(f"{where}.{key} must be a non-empty list of distinct names, got {names!r}")
    return list(names)


def _input_name(section: Mapping[str, Any], where: str, default: str) -> str:
    name = _get(section, "input", str, where, default)
    if not name:
        raise UserError(f"{where}.input must be a non-empty graph input name")
    return name


def _parse_metadata(data: Mapping[str, Any], source: str, version: int) -> MetadataInput | None:
    section = _extra_section(data, "metadata", source, version)
    if section is None:
        return None
    where = f"{source}: metadata"
    fields = _names(section, "fields", where)
    numbers = {}
    for key in ("mean", "std"):
        values = _get(section, key, list, where)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UserError(f"{where}.{key} must be a list of numbers, got {values!r}")
        numbers[key] = [float(v) for v in values]
    table = _get(section, "table", (str, type(None)), where, None)
    spec = MetadataInput(input=_input_name(section, where, "metadata"), fields=fields,
                         method=_get(section, "method", str, where), mean=numbers["mean"], std=numbers["std"],
                         table=table, case_column=_get(section, "case_column", str, where, "case"))
    try:
        spec.normalization()  # the same checks training's record passes: method, lengths, finite, std > 0
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return spec


def _parse_modalities(data: Mapping[str, Any], source: str, version: int, in_channels: int) -> ModalityInput | None:
    section = _extra_section(data, "modalities", source, version)
    if section is None:
        return None
    where = f"{source}: modalities"
    names = _names(section, "names", where)
    if len(names) != in_channels:
        raise UserError(f"{where}.names lists {len(names)} modalities but in_channels is {in_channels} "
                        "(one image channel per modality)")
    return ModalityInput(input=_input_name(section, where, "modality_mask"), names=names)


def _parse_keypoints(data: Mapping[str, Any], source: str, output_kind: str) -> dict[str, Any] | None:
    """The `keypoints` section (output_kind "heatmap" only): its decoding must build a KeypointDecoding."""
    section = _get(data, "keypoints", (dict, type(None)), source, None)
    if section is None:
        return None
    if output_kind != "heatmap":
        raise UserError(f"{source}: field 'keypoints' is for output_kind 'heatmap', not {output_kind!r}")
    from edgeseg.data.heatmaps import KeypointDecoding

    known = ("radius_mm", "threshold", "max_per_class")
    try:
        KeypointDecoding(**{k: section[k] for k in known if k in section})
    except (UserError, TypeError) as exc:
        raise UserError(f"{source}: keypoints: {exc}") from None
    return dict(section)


def _parse_stipple(data: Mapping[str, Any], source: str, version: int, files: Mapping[str, FileEntry],
                   spatial_dims: int, class_names: list[str], output_kind: str) -> StipplePrior | None:
    """The `stipple` section (schema version 3): settings as `edgeseg.config.schema.StippleConfig` validates
    them, its files listed in `files` with the same SHA-256, for a 3D softmax model of the same classes."""
    section = _get(data, "stipple", (dict, type(None)), source, None)
    if section is None:
        return None
    where = f"{source}: stipple"
    if version < STIPPLE_SCHEMA_VERSION:
        raise UserError(f"{source}: field 'stipple' (STIPPLE's prior) needs schema_version {STIPPLE_SCHEMA_VERSION}, "
                        f"the manifest says {version}")
    if spatial_dims != 3 or output_kind not in ("logits", "probabilities"):
        raise UserError(f"{where}: the prior is for a 3D softmax model (spatial_dims 3, output_kind logits or "
                        f"probabilities), not spatial_dims {spatial_dims}, output_kind {output_kind!r}")
    folder = safe_member_name(_get(section, "folder", str, where), where)
    listed = _get(section, "files", dict, where)
    for name, digest in listed.items():
        if not isinstance(name, str) or not name.startswith(f"{folder}/"):
            raise UserError(f"{where}.files: {name!r} is not inside the prior's folder {folder!r}")
        entry = files.get(safe_member_name(name, where))
        if entry is None or entry.sha256 != digest:
            raise UserError(f"{where}.files: {name} is missing from the bundle's files or its SHA-256 differs "
                            "from the prior's record")
    names = _names(section, "class_names", where)
    if names != class_names:
        raise UserError(f"{where}.class_names {names} differ from the model's class_names {class_names}")
    boxes = _get(section, "boxes", dict, where)
    for organ, box in boxes.items():
        if not (isinstance(box, list) and len(box) == 3 and all(isinstance(b, int) and b > 0 for b in box)):
            raise UserError(f"{where}.boxes.{organ} must be 3 positive integers, got {box!r}")
    eps = _get(section, "eps", (int, float), where)
    max_shift = _get(section, "max_shift", int, where)
    factors = _int_list(section, "factors", where)
    smoothing = _get(section, "reference_smoothing", (int, float), where)
    num_bins = _get(section, "num_bins", int, where)
    if not 0.0 < eps < 0.5 or max_shift < 0 or not 0.0 <= smoothing < 1.0 or num_bins < 2:
        raise UserError(f"{where}: eps must be within (0, 0.5), max_shift >= 0, reference_smoothing within [0, 1) "
                        f"and num_bins >= 2; got {eps}, {max_shift}, {smoothing}, {num_bins}")
    if factors != sorted(set(factors), reverse=True) or factors[-1] != 1:
        raise UserError(f"{where}.factors must decrease strictly and end with 1, got {factors}")
    return StipplePrior(folder=folder, files=dict(listed), class_names=names,
                        reference_case=_get(section, "reference_case", str, where), num_bins=num_bins,
                        boxes={str(k): list(v) for k, v in boxes.items()}, eps=float(eps), max_shift=max_shift,
                        factors=factors, reference_smoothing=float(smoothing))


def _check_preprocess(preprocess: dict[str, Any], source: str) -> None:
    """The preprocessing the runtime will repeat must build a PreprocessSpec; any problem is one line."""
    from edgeseg.data.preprocess import PreprocessSpec

    try:
        PreprocessSpec.from_dict(preprocess)
    except UserError as exc:
        raise UserError(f"{source}: preprocess: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong JSON type
        raise UserError(f"{source}: preprocess: invalid field ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------- reading


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_archive(path: Path) -> bool:
    return Path(path).suffix.lower() == ARCHIVE_SUFFIX


class _Reader:
    """Read named members of a bundle directory or `.zip` archive (never extracts anything)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"bundle not found: {self.path}")
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise UserError(f"{self.path}: not a bundle directory or .zip archive") from None
        elif not self.path.is_dir():
            raise UserError(f"{self.path}: not a bundle directory or .zip archive")

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(name)
            except KeyError:
                raise UserError(f"{self.path}: {name} is missing from the bundle archive") from None
            except (zipfile.BadZipFile, OSError) as exc:
                raise UserError(f"{self.path}: cannot read {name} ({exc})") from None
        file = self.path / name
        if not file.is_file():
            raise UserError(f"{self.path}: {name} is missing from the bundle")
        return file.read_bytes()


@dataclass
class Bundle:
    """A loaded, verified bundle. `model_bytes(form)` gives a self-contained ONNX model."""

    path: Path
    manifest: Manifest
    _reader: _Reader
    _stipple: Any = field(default=None, init=False, repr=False)  # the parsed prior, once `stipple_prior` read it

    def read_file(self, name: str) -> bytes:
        """A listed file's bytes, checked against the manifest's size and SHA-256 on every read."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise UserError(f"{self.path}: {name} is not listed in the manifest")
        data = self._reader.read(name)
        if len(data) != entry.bytes or sha256_hex(data) != entry.sha256:
            raise UserError(f"{self.path}: {name} does not match its SHA-256 in the manifest "
                            f"(the bundle was modified or damaged); re-export it")
        return data

    def model_bytes(self, form_name: str) -> bytes:
        """Serialized ONNX model of one form, weights inline, INT4 expanded to INT8, ready for ORT/TensorRT."""
        form = self.manifest.form(form_name)
        model = self.read_file(form.file)
        cache: dict[str, bytes] = {}

        def read_external(location: str, offset: int, length: int | None) -> bytes:
            name = str(PurePosixPath(form.file).parent / location)  # relative to the model file
            if name not in cache:
                cache[name] = self.read_file(safe_member_name(name, f"{self.path}: {form.file}"))
            data = cache[name]
            end = len(data) if length is None else offset + length
            if offset < 0 or end > len(data):
                raise UserError(f"{self.path}: {form.file} points outside {name}")
            return data[offset:end]

        try:
            return inline_model(model, read_external, expand_int4=form.packed_int4,
                                opset=form.opset if form.packed_int4 else None,
                                ir_version=form.ir_version if form.packed_int4 else None)
        except WireError as exc:
            raise UserError(f"{self.path}: {form.file} is not a readable ONNX model ({exc})") from None

    def ort_session(self, form_name: str, *, threads: int | None = None, providers: list[str] | None = None,
                    optimized_model_path: str | None = None) -> Any:
        """An onnxruntime InferenceSession for one form (with the form's session config entries)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning (as OMP_WAIT_POLICY=PASSIVE does for torch): on a
        # shared or busy CPU spinning made a 4-tile fp32 batch 1.4x slower here (0.85 vs 0.60 s, measured).
        # EDGESEG_ORT_SPINNING=1 restores ONNX Runtime's default for a dedicated device.
        spinning = "1" if os.environ.get("EDGESEG_ORT_SPINNING") == "1" else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        # The memory pattern pre-plans one block per input shape and keeps it: without it the memory above
        # the session fell 228 -> 113 MB (batch 1, 96^3 tile) and 911 -> 449 MB (batch 4) at equal CPU
        # time, measured. Disabling the CPU arena saved less and cost ~10% time, so the arena stays.
        # EDGESEG_ORT_MEM_PATTERN=1 restores ONNX Runtime's default.
        options.enable_mem_pattern = os.environ.get("EDGESEG_ORT_MEM_PATTERN") == "1"
        if optimized_model_path is not None:
            options.optimized_model_filepath = optimized_model_path
        for key, value in self.manifest.form(form_name).session_config.items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(self.model_bytes(form_name), options,
                                    providers=providers or ["CPUExecutionProvider"])

    def stipple_prior(self) -> Any:
        """The STIPPLE prior the runtime places on each volume (`edgeseg.priors.predict.PriorModel`), read from
        the bundle with every file's SHA-256 checked; None for other bundles. A file that is missing, changed,
        malformed, or whose classes, organ boxes, bins or reference differ from the manifest's `stipple` section
        is a UserError. Read once: `load_bundle` checks it, the pipeline then reuses it (it is immutable)."""
        if self.manifest.stipple is not None and self._stipple is None:
            self._stipple = self._read_stipple_prior(self.manifest.stipple)
        return self._stipple

    def _read_stipple_prior(self, spec: StipplePrior) -> Any:
        from edgeseg.priors.predict import PriorModel
        from edgeseg.priors.reference import read_reference
        from edgeseg.priors.stipple import read_prior

        def read(name: str) -> bytes:
            member = f"{spec.folder}/{name}"
            if member not in spec.files:
                raise UserError(f"{self.path}: {member} is not listed in the manifest's stipple.files")
            return self.read_file(member)

        where = f"{self.path}/{spec.folder}"
        prior, reference = read_prior(read, where), read_reference(read, where)
        classes = self.manifest.class_names
        boxes = {o.name: list(o.box) for o in prior.organs}
        problems = [
            (list(prior.class_names) != classes, f"classes {list(prior.class_names)} (the model's: {classes})"),
            ([o.label for o in prior.organs] != list(range(1, len(classes))), "not one organ per foreground class"),
            (boxes != spec.boxes, f"organ boxes {boxes} (the manifest's: {spec.boxes})"),
            (prior.num_bins != spec.num_bins, f"{prior.num_bins} bins (the manifest's: {spec.num_bins})"),
            (reference.name != spec.reference_case or reference.num_classes != len(classes),
             (f"reference {reference.name!r} with {reference.num_classes} classes (the manifest's: "
              f"{spec.reference_case!r})")),
        ]
        for bad, what in problems:
            if bad:
                raise UserError(f"{where}: the STIPPLE prior has {what}; re-export the bundle")
        return PriorModel(prior, reference, spec.max_shift, tuple(spec.factors), spec.eps, spec.reference_smoothing)


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a bundle's manifest without checking file hashes."""
    reader = _Reader(path)
    return _manifest_from(reader)


def _manifest_from(reader: _Reader) -> Manifest:
    source = f"{reader.path}/{MANIFEST}" if reader._zip is None else f"{reader.path}:{MANIFEST}"
    raw = reader.read(MANIFEST)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{source}: not valid JSON ({exc})") from None
    return Manifest.from_dict(data, source)


def load_bundle(path: Path | str, *, verify: bool = True) -> Bundle:
    """Open a bundle directory or `.zip`, validate its manifest and (by default) verify every file's hash."""
    reader = _Reader(Path(path))
    manifest = _manifest_from(reader)  # preprocess checked there (_check_preprocess)
    bundle = Bundle(path=Path(path), manifest=manifest, _reader=reader)
    if verify:
        for name in manifest.files:
            bundle.read_file(name)
        bundle.stipple_prior()  # a STIPPLE bundle's prior parses and matches its manifest section
    return bundle


def make_mc_masks(manifest: Manifest, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One random channel-dropout mask per MC site: 0 or 1/(1-p), float32. Shape: (batch, C, 1, ..., 1)."""
    masks = {}
    for site, shape in zip(manifest.mc_sites, manifest.mc_mask_shapes(batch).values()):
        keep = rng.random(shape) >= site.p
        masks[site.input] = (keep / (1.0 - site.p)).astype(np.float32)
    return masks
