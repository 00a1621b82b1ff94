"""open_dataset: a feature set as a Ray Dataset from its manifest's parts vs ``ray.data.read_parquet`` of the same files.

Every training run opens its feature set (and its validation set, and every evaluation its own)
as a Ray Dataset and materialises it before Ray Train starts. ``store.open_dataset`` reads the
parts the manifest lists, one Ray task a part; the baseline hands the same part paths and columns
to ``ray.data.read_parquet``, which lists the files and reads their metadata first. Both are timed
materialising the set on a warm local cluster (one untimed run each first), the median of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=24, help="synthetic videos (default 24)")
    p.add_argument("--repeats", type=int, default=5, help="timed materialisations each (default 5)")
    p.add_argument("--workdir", help="keep corpus and features here (default: a temp dir)")


def _median_seconds(make, repeats: int) -> tuple[float, int]:
    rows = make().materialize().count()  # warms Ray's workers for this reader
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        make().materialize()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), rows


def run(args) -> dict:
    import ray

    from benchmarks.corpus import feature_sets
    from benchmarks.report import publish, versions
    from vidray import storage
    from vidray.feature_store.store import open_dataset, open_version
    from vidray.train.job import start_local_ray

    workdir = args.workdir or tempfile.mkdtemp(prefix="vidray-bench-open-")
    start_local_ray(num_cpus=4, log_to_driver=False)
    try:
        uri = feature_sets(workdir, args.videos)["s3d"]
        columns = ["video_id", "features"]
        parts = open_version(uri).part_uris
        fs, _ = storage.arrow_filesystem(uri)
        paths = [storage.arrow_filesystem(p)[1] for p in parts]
        ours, rows = _median_seconds(lambda: open_dataset(uri, columns=columns), args.repeats)
        baseline, baseline_rows = _median_seconds(
            lambda: ray.data.read_parquet(paths, filesystem=fs, columns=columns), args.repeats)
    finally:
        ray.shutdown()
    assert rows == baseline_rows, (rows, baseline_rows)
    result = {"videos": args.videos, "parts": len(parts), "rows": rows, "repeats": args.repeats,
              "open_dataset_s": ours, "read_parquet_s": baseline, "speedup": baseline / ours,
              "versions": versions("ray", "pyarrow")}
    publish("open_dataset", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    return "\n".join([
        "## open_dataset: a feature set as a Ray Dataset, manifest parts vs `ray.data.read_parquet`",
        "",
        f"`python -m benchmarks open_dataset --videos {r['videos']} --repeats {r['repeats']}` — the s3d set of "
        f"{r['videos']} synthetic videos ({r['parts']} parts, {r['rows']} rows, local disk), materialised on a warm "
        f"local Ray cluster, median of {r['repeats']} runs each. {r['versions']}.",
        "",
        "| reader | seconds to materialise | vs read_parquet |",
        "|---|---:|---:|",
        f"| `store.open_dataset` (the manifest's parts, a task each) | {r['open_dataset_s']:.2f} | "
        f"{r['speedup']:.1f}x faster |",
        f"| `ray.data.read_parquet` (the same paths and columns) | {r['read_parquet_s']:.2f} | 1.0x |",
        "",
        f"Opening a set costs **{r['speedup']:.1f}x** less with the manifest's part list: a fixed cost that every "
        "training run, its validation set and every evaluation pays once before its first step.",
    ])
