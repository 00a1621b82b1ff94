"""`python -m benchmarks NAME [options]`; `python -m benchmarks all` runs every benchmark but the
long ``ablations`` and ``frames_ablations`` (run them by name)."""

from __future__ import annotations

import argparse
import importlib
import time

# Plain-dict registry: benchmark name -> module with `add_arguments(parser)` and `run(args)`.
BENCHMARKS = {"decode": "benchmarks.decode", "feature_cache": "benchmarks.feature_cache",
              "sweep_asha": "benchmarks.sweep_asha", "ray_overhead": "benchmarks.ray_overhead",
              "retrieval_eval": "benchmarks.retrieval_eval", "ingest": "benchmarks.ingest",
              "frames_ingest": "benchmarks.frames_ingest", "open_dataset": "benchmarks.open_dataset", "gpu_check": "benchmarks.gpu_check",
              "scale": "benchmarks.scale",
              "extract_scaling": "benchmarks.extract_scaling", "text_extract": "benchmarks.text_extract",
              "memory": "benchmarks.memory", "padding": "benchmarks.padding",
              "ablations": "benchmarks.ablations", "frames_ablations": "benchmarks.frames_ablations"}
# Not part of `all` (`make bench`): the ablations take tens of minutes to an hour on 2 cores each,
# scale about ten; gpu_check needs a CUDA device (`make gpu-check`).
BY_NAME_ONLY = {"ablations", "frames_ablations", "gpu_check", "scale"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    sub.add_parser("all", help="every benchmark with its defaults, but " + ", ".join(sorted(BY_NAME_ONLY)))
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=mod.__doc__.splitlines()[0].replace("%", "%%")))
    args = parser.parse_args()
    from benchmarks import report

    names = [n for n in BENCHMARKS if n not in BY_NAME_ONLY] if args.name == "all" else [args.name]
    started = time.monotonic()
    for name in names:
        mod = importlib.import_module(BENCHMARKS[name])
        if len(names) > 1:
            args = sub.choices[name].parse_args([])
        report.STARTED = time.monotonic()
        mod.run(args)
        print(f"{name}: {time.monotonic() - report.STARTED:.0f} s")
    if len(names) > 1:
        print(f"all {len(names)} benchmarks: {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
