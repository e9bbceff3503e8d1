"""Child process for peak-memory measurement: evaluate one bundle on a split, then exit.

Run as `python -m edgeseg.report.memprobe BUNDLE --split test [--data DIR] [--evaluator module:func]`;
it prints its own peak RSS in bytes as the last `MARKER` line (edgeseg.report.collect.subprocess_peak_rss).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeseg.report.collect import DEFAULT_EVALUATOR, load_evaluator

MARKER = "edgeseg-peak-rss-bytes="


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM on Linux, ru_maxrss elsewhere (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgeseg.report.memprobe")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--evaluator", default=DEFAULT_EVALUATOR)
    args = parser.parse_args(argv)
    load_evaluator(args.evaluator)(args.bundle, args.data, args.split)
    print(f"{MARKER}{peak_rss_bytes()}", flush=True)


if __name__ == "__main__":
    main()
