"""Segment many volumes: worker processes, keep going past failures, skip finished cases (torch-free).

`segment_batch` is what `edgeseg segment` runs. With `workers` > 1 the volumes are spread over a
`ProcessPoolExecutor` (spawn context: fresh interpreters, no forked ONNX Runtime / CUDA state).
Each worker opens its own backend once, with intra-op threads = cores / workers (or --threads),
and sees one GPU (CUDA_VISIBLE_DEVICES, round-robin over the visible GPUs), so the GPU backends
(TensorRT, ONNX Runtime's CUDA/TensorRT providers) spread over the GPUs present. With one worker
the volumes run in this process, one after the other.

- Streaming: a worker writes a case's files (atomically) as soon as it is segmented; at most one
  case per worker is in flight, so memory stays at `workers` volumes.
- Keep going: a case that raises is recorded as failed with the reason and the others go on; a
  worker process that dies (e.g. killed for memory) fails the cases it and the other workers were
  running at that moment (they cannot be told apart) and a fresh pool takes the rest. A backend that
  cannot start at all stops the call with one UserError line.
- Re-running skips a case whose planned outputs all exist (every file is written atomically, so an
  existing file is complete); `overwrite` redoes it. A case with only some of its files (killed
  between two writes, or asked for new outputs) is redone. Presence is all that is checked: after
  changing the bundle or options, pass `overwrite`.
- The outcome of every case (done / skipped / failed and why) is returned and written to
  OUT/segment_summary.json.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edgeseg.errors import UserError, unknown_name
from edgeseg.runtime.pipeline import (
    InputCase,
    OnBatch,
    OutputPaths,
    SegmentOptions,
    check_outputs,
    collect_cases,
    plan_outputs,
    segment_case,
    segment_options,
)

SUMMARY_FILE = "segment_summary.json"
Status = Literal["done", "skipped", "failed"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one case."""

    case: str
    status: Status
    seconds: float = 0.0
    reason: str | None = None  # why it failed or was skipped
    mask: str | None = None
    structures: int | None = None  # with uncertainty outputs: structures found, and removed (--iou-threshold)
    removed: int = 0
    worker: int | None = None  # None: this process
    gpu: str | None = None  # the CUDA device the worker saw
    backend: str | None = None  # the backend's one-line description
    prior_shift: list[int] | None = None  # STIPPLE bundles: the prior's placement (voxels from the reference volume)
    traceback: str | None = None  # for unexpected errors (not UserError)


@dataclass(frozen=True)
class EngineSpec:
    """What a worker opens: the bundle and backend settings (plain values, sent to each worker)."""

    bundle_path: str
    backend: str
    mc: bool
    threads: int | None
    batch_size: int
    tile: tuple[int, ...]


@dataclass
class BatchReport:
    outcomes: list[Outcome]  # in input order
    workers: int
    threads: int | None  # intra-op threads per worker (None: the backend's default)
    seconds: float

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class BackendStartError(UserError):
    """A worker could not open the backend: every case would fail the same way."""


def is_complete(plan: OutputPaths) -> bool:
    """True when every planned output of a case exists (each was written atomically, so is whole)."""
    return all(p.is_file() for p in plan.all())


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """CUDA device ids workers can be given: CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        return [] if not ids or ids[0].startswith("-") else ids
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def failure_reason(exc: BaseException) -> str:
    """One line: a UserError's message, else the exception type and its first line."""
    if isinstance(exc, UserError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------- one case


def _run_case(case: InputCase, plan: OutputPaths, manifest, engine, options: SegmentOptions, bundle_path: str,
              worker: int | None, gpu: str | None, on_batch: OnBatch | None = None, prior: Any = None) -> Outcome:
    try:
        result = segment_case(case, plan, manifest, engine, options, bundle_path=bundle_path, on_batch=on_batch,
                              prior=prior)
    except Exception as exc:  # noqa: BLE001 - recorded per case; the batch keeps going
        trace = None if isinstance(exc, UserError) else traceback.format_exc()
        return Outcome(case.name, "failed", reason=failure_reason(exc), worker=worker, gpu=gpu,
                       backend=engine.description, traceback=trace)
    return Outcome(case.name, "done", seconds=result.seconds, mask=str(result.outputs.mask),
                   structures=result.structures, removed=result.removed, worker=worker, gpu=gpu,
                   backend=engine.description,
                   prior_shift=None if result.prior_shift is None else list(result.prior_shift))


# ------------------------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _init_worker(ids: Any, spec: EngineSpec, gpus: list[str]) -> None:
    """Runs once in each worker before anything imports CUDA: take an index, pin one GPU."""
    index = int(ids.get())
    gpu = gpus[index % len(gpus)] if gpus else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _WORKER.clear()
    _WORKER.update(index=index, gpu=gpu, spec=spec)


def _open_worker_engine() -> tuple[Any, Any]:
    """The worker's bundle manifest and backend (and STIPPLE prior, `_WORKER["prior"]`), opened on its first case."""
    if "engine" not in _WORKER:
        from edgeseg.runtime.backends import open_backend
        from edgeseg.runtime.bundle import load_bundle

        spec: EngineSpec = _WORKER["spec"]
        try:
            bundle = load_bundle(spec.bundle_path, verify=False)  # the parent verified it; reads re-check hashes
            prior = bundle.stipple_prior()  # read with every file's hash checked
            engine = open_backend(bundle, spec.backend, mc=spec.mc, threads=spec.threads, batch_size=spec.batch_size,
                                  tile=list(spec.tile))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
            raise BackendStartError(f"worker {_WORKER['index']} could not open the backend: "
                                    f"{failure_reason(exc)}") from None
        _WORKER.update(manifest=bundle.manifest, engine=engine, prior=prior)
    return _WORKER["manifest"], _WORKER["engine"]


def _work(case: InputCase, plan: OutputPaths, options: SegmentOptions) -> Outcome:
    manifest, engine = _open_worker_engine()
    return _run_case(case, plan, manifest, engine, options, _WORKER["spec"].bundle_path, _WORKER["index"],
                     _WORKER["gpu"], prior=_WORKER["prior"])


def _pool(workers: int, spec: EngineSpec, gpus: list[str]) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")
    ids = context.Queue()
    for i in range(workers):
        ids.put(i)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(ids, spec, gpus))


def _run_pool(todo: Sequence[tuple[InputCase, OutputPaths]], options: SegmentOptions, spec: EngineSpec, workers: int,
              gpus: list[str], emit: Callable[[Outcome], None]) -> None:
    """At most one case per worker in flight; outcomes are emitted as cases finish."""
    pending = deque(todo)
    while pending:
        executor = _pool(workers, spec, gpus)
        running: dict[Future, InputCase] = {}
        broken = False
        try:
            while running or (pending and not broken):
                while pending and not broken and len(running) < workers:
                    case, plan = pending.popleft()
                    try:
                        running[executor.submit(_work, case, plan, options)] = case
                    except BrokenProcessPool:
                        pending.appendleft((case, plan))
                        broken = True
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    case = running.pop(future)
                    try:
                        emit(future.result())
                    except BrokenProcessPool:
                        broken = True
                        emit(Outcome(case.name, "failed", reason="a worker process died while this case ran "
                                     "(killed, e.g. out of memory; it or a case running beside it caused it)"))
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        executor.shutdown(wait=True)


# ------------------------------------------------------------------------------------- the batch


def segment_batch(
    bundle_path: Path | str,
    inputs: Sequence[str | Path],
    out_dir: Path | str,
    *,
    workers: int = 1,
    backend: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    on_start: Callable[[str, int, int], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_batch: OnBatch | None = None,
    **segment_kwargs: Any,
) -> BatchReport:
    """Segment every input into `out_dir` with `workers` processes; see the module docstring.

    `segment_kwargs` are `pipeline.segment_options`' (tta, tta_axes, mc_passes, uncertainty, ...; metadata,
    metadata_table, modalities for bundles with extra model inputs).
    Options, inputs and the bundle are checked before any work (UserError). `on_start(description,
    cases to run, cases skipped)`, `on_outcome(outcome)` per case (skipped ones included) and
    `on_batch(done, total)` (tile batches; one worker only) report progress.
    """
    from edgeseg.atomic import write_json
    from edgeseg.runtime.backends import BACKEND_CHOICES, open_backend, tensorrt_available
    from edgeseg.runtime.bundle import load_bundle

    started = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if backend not in BACKEND_CHOICES:
        raise unknown_name("backend", backend, BACKEND_CHOICES)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    prior = bundle.stipple_prior()  # STIPPLE bundles: the spatial prior placed on every volume
    options = segment_options(manifest, **segment_kwargs)
    cases = collect_cases(inputs, manifest, options)  # extra model inputs resolved: errors before any work
    plans = plan_outputs(cases, out_dir, options)
    check_outputs(cases, plans, overwrite=True)  # only refuses outputs that would replace an input
    skip = {c.name for c, p in zip(cases, plans) if not overwrite and is_complete(p)}
    todo = [(c, p) for c, p in zip(cases, plans) if c.name not in skip]
    outcomes: dict[str, Outcome] = {}

    def emit(outcome: Outcome) -> None:
        outcomes[outcome.case] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    n = max(1, min(workers, len(todo)))
    per_worker = threads if threads is not None else (max(1, available_cores() // n) if n > 1 else None)
    if n == 1:
        engine = open_backend(bundle, backend, mc=options.mc_passes > 0, threads=per_worker,
                              batch_size=options.batch_size, tile=list(options.tile)) if todo else None
        description = engine.description if engine is not None else "nothing to run"
    else:
        if backend == "tensorrt" and (reason := tensorrt_available()) is not None:
            raise UserError(f"--backend tensorrt: {reason}")
        gpus = visible_gpus()
        gpu_text = f", GPUs {', '.join(gpus)} round-robin" if gpus else ""
        description = f"{n} worker processes, {per_worker} thread(s) each, backend {backend}{gpu_text}"
    if on_start is not None:
        on_start(description, len(todo), len(skip))
    for case, plan in zip(cases, plans):
        if case.name in skip:
            emit(Outcome(case.name, "skipped", reason="outputs exist (pass --overwrite to redo)", mask=str(plan.mask)))
    if n == 1:
        try:
            for case, plan in todo:
                emit(_run_case(case, plan, manifest, engine, options, str(bundle_path), None, None, on_batch,
                               prior))
        finally:
            if engine is not None:
                engine.close()
    else:
        spec = EngineSpec(bundle_path=str(bundle_path), backend=backend, mc=options.mc_passes > 0, threads=per_worker,
                          batch_size=options.batch_size, tile=tuple(options.tile))
        _run_pool(todo, options, spec, n, gpus, emit)
    report = BatchReport(outcomes=[outcomes[c.name] for c in cases if c.name in outcomes], workers=n,
                         threads=per_worker, seconds=time.perf_counter() - started)
    write_json(Path(out_dir) / SUMMARY_FILE, {
        "bundle": str(bundle_path), "workers": report.workers, "threads_per_worker": report.threads,
        "backend": description, "seconds": round(report.seconds, 3),
        "counts": {s: report.count(s) for s in ("done", "skipped", "failed")},
        "cases": [asdict(o) for o in report.outcomes],
    })
    return report
