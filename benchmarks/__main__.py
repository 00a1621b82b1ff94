"""`python -m benchmarks NAME [options]`; `python -m benchmarks all` runs every benchmark."""

from __future__ import annotations

import argparse
import importlib

# Plain-dict registry: benchmark name -> module with `add_arguments(parser)` and `run(args)`.
BENCHMARKS = {"decode": "benchmarks.decode", "feature_cache": "benchmarks.feature_cache",
              "sweep_asha": "benchmarks.sweep_asha", "ray_overhead": "benchmarks.ray_overhead"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    sub.add_parser("all", help="every benchmark with its defaults")
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=mod.__doc__.splitlines()[0]))
    args = parser.parse_args()
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        mod = importlib.import_module(BENCHMARKS[name])
        if args.name == "all":
            args = sub.choices[name].parse_args([])
        mod.run(args)


if __name__ == "__main__":
    main()
