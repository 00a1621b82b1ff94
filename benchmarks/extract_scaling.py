"""extract_scaling: `vidray extract` (S3D) videos/s with 1 vs 2 CPU workers, fused vs split, and each stage alone.

The real extraction job (decode every frame at 30 fps, S3D-G tiny, Parquet parts, commit) runs on
the same synthetic corpus four times, each into a fresh feature-store root on a fresh local Ray
cluster: one worker on a 1-CPU cluster (the baseline), two workers on a 2-CPU cluster, one worker
given both CPUs as torch threads, and the split pipeline on 2 CPUs (Ray Data decode tasks feeding
one network actor; `pipeline=split`). Scaling efficiency = rate(2 workers) / (2 x rate(1)).
Two rates per run: end to end (Ray Data and actor start-up, model build, manifest and commit
included), as a user sees it, and steady state, from the write times of the first and the last
Parquet part (one video per part), which is what a long extraction runs at.

The two stages of the split pipeline are also timed alone, in this process on one core: decoding
a video into its one-second windows, and the network on windows already decoded. Decode and
network share each core in the fused pipeline; split, the slower stage sets the pace.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

# (label, cluster CPUs, extractor actors, pipeline)
RUNS = (("fused: 1 worker, 1 CPU", 1, 1, "fused"), ("fused: 2 workers, 1 CPU each", 2, 2, "fused"),
        ("fused: 1 worker, 2 CPUs (torch threads)", 2, 1, "fused"),
        ("split: decode tasks + 1 network actor, 2 CPUs", 2, 1, "split"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=32, help="synthetic videos (default 32)")
    p.add_argument("--min-seconds", type=float, default=4.0)
    p.add_argument("--max-seconds", type=float, default=8.0)
    p.add_argument("--size", type=int, default=112, help="S3D input size (reference: 224)")
    p.add_argument("--workdir", help="keep corpus and features here (default: a temp dir)")


def _extract(manifest: str, root: str, size: int, cpus: int, workers: int, pipeline: str) -> dict:
    import ray

    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import S3DExtractConfig
    from vidray.train.job import start_local_ray

    start_local_ray(num_cpus=cpus, log_to_driver=False)
    try:
        report = run_extract(ExtractConfig(manifest=manifest, root=root, extractor="s3d", videos_per_part=1,
                                         num_workers=workers, pipeline=pipeline,
                                         s3d=S3DExtractConfig(flavour="tiny", size=size)),
                           progress=False, say=lambda m: None)
    finally:
        ray.shutdown()
    written = sorted(os.path.getmtime(p) for p in glob.glob(os.path.join(report["uri"], "part-*.parquet")))
    report["steady_videos_per_s"] = (len(written) - 1) / (written[-1] - written[0])
    return report


def stage_rates(manifest: str, size: int) -> dict:
    """Videos/s of each split stage alone on one core: decode into windows; the network on them."""
    import torch

    from vidray.data.manifest import read_manifest
    from vidray.feature_store.extractors import S3DExtractConfig, S3DExtractor

    torch.set_num_threads(1)
    cfg = S3DExtractConfig(flavour="tiny", size=size)
    uris = read_manifest(manifest)["uri"].to_pylist()
    start = time.perf_counter()
    decoded = [list(S3DExtractor.window_batches(cfg, uri)) for uri in uris]
    decode_s = time.perf_counter() - start
    extractor = S3DExtractor(cfg)
    start = time.perf_counter()
    for batches in decoded:
        for batch in batches:
            extractor.features(batch)
    network_s = time.perf_counter() - start
    seconds = sum(len(b) for batches in decoded for b in batches)
    return {"decode_videos_per_s": len(uris) / decode_s, "network_videos_per_s": len(uris) / network_s,
            "video_seconds": seconds}


def run(args) -> dict:
    from benchmarks.report import publish, versions
    from vidray.data.synth import SynthConfig, synthesize

    workdir = args.workdir or tempfile.mkdtemp(prefix="vidray-bench-extract-")
    corpus = os.path.join(workdir, "corpus")
    manifest = os.path.join(corpus, "manifest.parquet")
    if not os.path.exists(manifest):
        synthesize(corpus, SynthConfig(videos=args.videos, seed=11, min_seconds=args.min_seconds,
                                       max_seconds=args.max_seconds), progress=False)
    runs = []
    for i, (label, cpus, workers, pipeline) in enumerate(RUNS):
        report = _extract(manifest, os.path.join(workdir, f"features-{i}-{os.getpid()}"), args.size, cpus, workers,
                          pipeline)
        if report["extracted_videos"] != args.videos or report["quarantined"]:
            raise RuntimeError(f"{label}: extracted {report['extracted_videos']} of {args.videos} videos, "
                               f"{report['quarantined']} quarantined")
        runs.append({"label": label, "cpus": cpus, "workers": workers, "pipeline": pipeline, "seconds": report["seconds"],
                     "videos_per_s": args.videos / report["seconds"], "steady_videos_per_s": report["steady_videos_per_s"]})
    base, two = runs[0]["steady_videos_per_s"], runs[1]["steady_videos_per_s"]
    result = {"videos": args.videos, "min_seconds": args.min_seconds, "max_seconds": args.max_seconds,
              "size": args.size, "runs": runs, "speedup": two / base, "efficiency": two / (2 * base),
              "threads_speedup": runs[2]["steady_videos_per_s"] / base,
              "end_to_end_speedup": runs[1]["videos_per_s"] / runs[0]["videos_per_s"],
              "split_vs_fused": runs[3]["steady_videos_per_s"] / two, "stages": stage_rates(manifest, args.size),
              "versions": versions("ray", "torch", "av", "pyarrow")}
    publish("extract_scaling", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    command = (f"python -m benchmarks extract_scaling --videos {r['videos']} --min-seconds {r['min_seconds']:g} "
               f"--max-seconds {r['max_seconds']:g} --size {r['size']}")
    base, base_e2e = r["runs"][0]["steady_videos_per_s"], r["runs"][0]["videos_per_s"]
    lines = [
        "## extract_scaling: S3D extraction with 1 vs 2 CPU workers, fused vs split",
        "",
        f"`{command}` — the real `vidray extract` (S3D-G tiny at {r['size']} px, every frame decoded at 30 fps, "
        f"one video per Parquet part) on {r['videos']} synthetic videos of {r['min_seconds']:g}-"
        f"{r['max_seconds']:g} s, each run on a fresh local Ray cluster of that many CPUs. Steady state: from the "
        "first part written to the last; end to end: the whole job. "
        f"{r['versions']}.",
        "",
        "| run | steady videos/s | vs 1 worker | job wall time | end-to-end videos/s | vs 1 worker |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {x['label']} | {x['steady_videos_per_s']:.2f} | {x['steady_videos_per_s'] / base:.2f}x | "
              f"{x['seconds']:.1f} s | {x['videos_per_s']:.2f} | {x['videos_per_s'] / base_e2e:.2f}x |"
              for x in r["runs"]]
    lines += [
        "",
        f"Two workers extract **{r['speedup']:.2f}x** as fast as one: scaling efficiency **{r['efficiency']:.0%}**. "
        f"Giving one worker both cores as torch threads reaches {r['threads_speedup']:.2f}x"
        + (", so extraction scales by adding actors (one per CPU, the default) rather than threads. "
           if r["threads_speedup"] < r["speedup"] else
           ", as much as a second actor: threads serve as well as actors at this size. ")
        + f"End to end the gain is {r['end_to_end_speedup']:.2f}x: each job pays a fixed start-up of a few "
        "seconds (Ray Data, actors, model build, commit) that a real corpus amortises. On these 2 cores the "
        "workers also share them with the driver and Ray's own processes.",
    ]
    st = r["stages"]
    decode, network, two = st["decode_videos_per_s"], st["network_videos_per_s"], r["runs"][1]["steady_videos_per_s"]
    fused_bound, split_bound = 2 / (1 / decode + 1 / network), min(decode, network)
    lines += [
        "",
        f"Split stages alone, one core each, in one process: decoding into one-second windows "
        f"{st['decode_videos_per_s']:.2f} videos/s, the network on decoded windows {st['network_videos_per_s']:.2f} "
        f"videos/s ({st['video_seconds']} seconds of video). From these alone, fused on 2 cores can reach "
        f"2 / (1/decode + 1/network) = {fused_bound:.2f} videos/s (measured {two:.2f}); split, with one core "
        f"decoding and one running the network, min(decode, network) = {split_bound:.2f} (measured "
        f"{r['runs'][3]['steady_videos_per_s']:.2f}, **{r['split_vs_fused']:.2f}x** fused). On CPUs the network "
        "is the slow stage, and fused runs it on every core, so fused stays the CPU default (`pipeline=auto`). "
        "On a GPU node the network is the fast stage and decoding the slow one: split decodes on every core "
        "and the GPU waits for none of it, where a fused actor's GPU idles while that actor decodes "
        "(`make gpu-check` measures both on a device).",
    ]
    return "\n".join(lines)
