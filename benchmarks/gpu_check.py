"""gpu_check: the GPU figures in one call (`make gpu-check`): bf16 training step and MFU of VLM-base and All-in-one-base, the compiled step, and extraction throughput (fused with actors per GPU, split).

Every figure comes from the real jobs on a local Ray cluster over the machine's GPUs, one Train
worker: `vidray pretrain` logs each step's rate and model FLOPs (torch's FLOP counter on the
first batch) and MFU against the GPU's bf16 peak; the steady rate is read from the MLflow metric
timestamps after the first ``--warm`` steps (the first steps pay cuDNN/Inductor start-up).
`vidray extract` runs the S3D (full, 224 px) and EfficientNet-Lite0 (image2d) extractors fused
with 1 and 2 actors per GPU, and split (CPU decode tasks feeding one network actor per GPU). On
a CUDA machine it writes its section of BENCHMARKS.md with the device named. ``--dry-run`` runs
the same jobs on CPU with tiny models and a few steps and publishes nothing, leaving out the
compiled step (Inductor's CPU build takes minutes), 2 actors per GPU (no GPU to share) and
image2d split: the test suite runs it, so the script works when a GPU turns up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny models, a few steps, nothing published (what the tests run)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    p.add_argument("--warm", type=int, default=10, help="steps left out of the steady rate (default 10)")
    p.add_argument("--batch", type=int, default=64, help="batch per run (default 64)")
    p.add_argument("--videos", type=int, default=48, help="synthetic videos (default 48)")
    p.add_argument("--workdir", help="keep corpus, features and runs here (default: a temp dir)")


def _steady(run_id: str, tracking_uri: str, batch: int, warm: int) -> dict:
    """Steady examples/s (metric timestamps after ``warm`` steps) and the model FLOPs per example."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    history = {m.step: m for m in client.get_metric_history(run_id, "examples_per_s")}
    tflops = {m.step: m.value for m in client.get_metric_history(run_id, "tflops_per_worker")}
    last = max(history)
    first = min(warm, last - 1)
    seconds = (history[last].timestamp - history[first].timestamp) / 1000
    rate = batch * (last - first) / seconds
    flops_per_example = tflops[last] * 1e12 / history[last].value   # tflops = rate x FLOPs / 1e12
    return {"steady_examples_per_s": rate, "training_gflops_per_example": flops_per_example / 1e9,
            "achieved_tflops": rate * flops_per_example / 1e12, "steps": last}


def _train_runs(args, workdir: str, device: str, tracking_uri: str) -> list[dict]:
    from benchmarks.corpus import feature_sets, frames_set
    from vidray.config import load_config
    from vidray.config.frames import FramesPretrainConfig
    from vidray.config.train import PretrainConfig
    from vidray.train.frames_run import run_frames_pretrain
    from vidray.train.loop import peak_tflops
    from vidray.train.vlm_pretrain import run_pretrain

    flavour = "tiny" if args.dry_run else "base"
    common = [f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.num_workers=1",
              f"train.use_gpu={device == 'cuda'}", "train.precision=bf16", f"train.checkpoint_every={args.steps}",
              f"train.storage_path={os.path.join(workdir, 'runs')}", "mlflow.experiment=gpu-check",
              f"mlflow.tracking_uri={tracking_uri}", "optim.warmup_steps=5"]
    vlm_data = feature_sets(os.path.join(workdir, "vlm"), args.videos)
    frames = frames_set(os.path.join(workdir, "frames"), args.videos, 3, 64 if args.dry_run else 224)
    runs = []
    # The dry run leaves out the compiled step: Inductor's CPU build takes minutes, the path is the same.
    for name, compiled in (("VLM", False), ("VLM, train.compile", True))[:1 if args.dry_run else 2]:
        cfg = load_config(PretrainConfig, None, common + [
            f"data.features={vlm_data['s3d']}", f"data.text={vlm_data['text']}", f"model.flavour={flavour}",
            f"train.compile={compiled}", f"train.run_name=gpu-check-vlm-{compiled}-{time.time_ns()}"])
        runs.append({"model": f"{name} {flavour}", **_measure(run_pretrain(cfg, say=print), tracking_uri, args)})
    cfg = load_config(FramesPretrainConfig, None, common + [
        f"data.frames={frames['frames']}", f"model.flavour={flavour}", "model.arch=allinone",
        "model.num_frames=3", f"model.image_size={64 if args.dry_run else 224}",
        f"train.run_name=gpu-check-allinone-{time.time_ns()}"])
    runs.append({"model": f"All-in-one {flavour}", **_measure(run_frames_pretrain(cfg, say=print), tracking_uri, args)})
    import torch

    peak = peak_tflops(torch.cuda.get_device_name(0)) if device == "cuda" else None
    for run in runs:
        run["mfu"] = run["achieved_tflops"] / peak if peak else None
    return runs


def _measure(report: dict, tracking_uri: str, args) -> dict:
    return {"mlflow_run_id": report["mlflow_run_id"], **_steady(report["mlflow_run_id"], tracking_uri, args.batch,
                                                                 args.warm)}


def _extract_runs(args, workdir: str, device: str) -> list[dict]:
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import Image2DExtractConfig, S3DExtractConfig

    manifest = os.path.join(workdir, "vlm", "corpus", "manifest.parquet")
    extractors = {"s3d": {"s3d": S3DExtractConfig(flavour="tiny" if args.dry_run else "full",
                                                  size=32 if args.dry_run else 224)},
                  "image2d": {"image2d": Image2DExtractConfig(flavour="tiny" if args.dry_run else "lite0")}}
    # (pipeline, actors per GPU): each actor decoding its own videos, alone or two to a GPU, against
    # CPU decode tasks feeding the GPU's network actor.
    variants = [("fused", 1), ("fused", 2), ("split", 1)]
    out = []
    for name, settings in extractors.items():
        for pipeline, per_gpu in variants if device == "cuda" else [v for v in variants if v[1] == 1]:
            if args.dry_run and name != "s3d" and pipeline != "fused":
                continue
            report = run_extract(ExtractConfig(manifest=manifest, root=os.path.join(workdir, f"extract-{pipeline}-{per_gpu}"),
                                               extractor=name, use_gpu=device == "cuda", actors_per_gpu=per_gpu,
                                               pipeline=pipeline, **settings), progress=False)
            out.append({"extractor": name, "pipeline": pipeline, "actors_per_gpu": per_gpu,
                        "videos_per_s": report["videos_per_s"], "videos": report["videos"], "seconds": report["seconds"]})
    return out


def run(args) -> dict:
    import ray
    import torch

    from benchmarks.report import publish, versions
    from vidray.train.job import start_local_ray

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("gpu_check: torch sees no CUDA device. On a GPU machine install torch's CUDA build "
                         "(`make gpu-check` does), or run `python -m benchmarks gpu_check --dry-run` to check "
                         "the script on CPU")
    if args.dry_run:
        args.steps, args.warm, args.batch, args.videos = min(args.steps, 6), min(args.warm, 2), min(args.batch, 4), \
            min(args.videos, 6)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vidray-gpu-check-")
    tracking_uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    started = not ray.is_initialized()   # the tests run it on their session's cluster
    if started:
        start_local_ray(num_cpus=max(os.cpu_count() or 1, 4), log_to_driver=False)
    try:
        train = _train_runs(args, workdir, device, tracking_uri)
        extract = _extract_runs(args, workdir, device)
    finally:
        if started:
            ray.shutdown()
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
              "steps": args.steps, "warm": args.warm, "batch": args.batch, "videos": args.videos,
              "train": train, "extract": extract, "versions": versions("ray", "torch")}
    if args.dry_run:
        print(result)
        return result
    publish("gpu_check", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    command = f"make gpu-check  # python -m benchmarks gpu_check --steps {r['steps']} --warm {r['warm']} " \
              f"--batch {r['batch']} --videos {r['videos']}"
    lines = [f"## gpu_check: bf16 training steps, MFU and extraction on {r['device']}", "",
             f"`{command}` — one Train worker, bf16 autocast, batch {r['batch']}, {r['steps']} steps, the steady rate "
             f"after {r['warm']} steps from MLflow's metric timestamps; {r['versions']}.", "",
             "| run | examples/s | training GFLOPs per example | TFLOP/s | MFU |", "|---|---:|---:|---:|---:|"]
    for t in r["train"]:
        mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "n/a"
        lines.append(f"| {t['model']} | {t['steady_examples_per_s']:,.1f} | {t['training_gflops_per_example']:,.1f} | "
                     f"{t['achieved_tflops']:,.1f} | {mfu} |")
    lines += ["", "| extractor | pipeline | actors per GPU | videos/s | vs fused, 1 actor |", "|---|---|---:|---:|---:|"]
    one = {e["extractor"]: e["videos_per_s"] for e in r["extract"] if e["actors_per_gpu"] == 1 and e["pipeline"] == "fused"}
    for e in r["extract"]:
        lines.append(f"| {e['extractor']} | {e['pipeline']} | {e['actors_per_gpu']} | {e['videos_per_s']:,.2f} | "
                     f"{e['videos_per_s'] / one[e['extractor']]:.2f}x |")
    return "\n".join(lines)
