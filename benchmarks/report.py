"""Write a benchmark's JSON result and refresh its section of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
STARTED = time.monotonic()  # reset by `python -m benchmarks` before each benchmark: its wall time


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}"


def versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def publish(name: str, result: dict, markdown: str) -> None:
    """Save ``result`` as JSON and replace the ``name`` section of BENCHMARKS.md with ``markdown``."""
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    wall_s = round(time.monotonic() - STARTED)
    result = {"benchmark": name, "when": stamp, "machine": machine(), "wall_s": wall_s, **result}
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    section = (f"<!-- {name}:start -->\n{markdown.rstrip()}\n\n"
               f"_Measured {stamp} on {result['machine']}; the benchmark took {wall_s} s._\n<!-- {name}:end -->")
    text = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(BENCHMARKS_MD, "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(RESULTS, name + '.json')} and the '{name}' section of BENCHMARKS.md")
