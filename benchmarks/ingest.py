"""ingest: Ray Data feature set -> iter_torch_batches -> the train loop's CPU work, vs VLM-base's step rate.

Each Ray Train worker consumes its streaming split of the pre-training examples exactly as
`vidray pretrain` does (the same dataset, `repeat_for_steps`, `iter_torch_batches` with the VLM
collate, and the MMM/MLM/MFM masking the loop runs on CPU before every step) but does no model
work, so its rate is the most the data path can feed one worker. The rate a model consumes is
measured beside it: a VLM-base training step (forward, backward, Adam) on this CPU. GPU
consumption is derived, not measured, until a GPU is lent: VLM-base's training FLOPs per example
(3x the forward's, counted by torch's FLOP counter) at the 40% MFU target on an H100 (989 TFLOP/s
dense bf16). The target: ingest per worker >= 2x that per-GPU rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial

H100_BF16_DENSE_FLOPS = 989.4e12
MFU_TARGET = 0.40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=24, help="synthetic videos (default 24)")
    p.add_argument("--batch", type=int, default=256, help="global batch, split over the workers (default 256)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker (default 40)")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run (default 1,2)")
    p.add_argument("--step-batch", type=int, default=8, help="batch of the timed VLM-base CPU steps (default 8)")
    p.add_argument("--workdir", help="keep corpus and features here (default: a temp dir)")


def _config(data: dict, batch: int, workers: int):
    from vidray.config import load_config
    from vidray.config.train import PretrainConfig

    return load_config(PretrainConfig, None, [
        f"data.features={data['s3d']}", f"data.text={data['text']}", "data.clips_per_video=16",
        "model.flavour=base", "model.max_video_tokens=32", "model.max_seq_len=96",
        f"train.batch_size={batch}", f"train.num_workers={workers}"])


def _collate_and_special(cfg):
    """The VLM collate of ``cfg`` and its special ids, without building the model (VLMSystem's)."""
    from vidray.data.vlm import collate
    from vidray.models.vlm import BERT_UNCASED_VOCAB
    from vidray.objectives.vlm import SpecialIds

    special = SpecialIds(vocab_size=BERT_UNCASED_VOCAB)
    return partial(collate, max_video_tokens=cfg.model.max_video_tokens, max_text_tokens=cfg.data.max_text_tokens,
                   sep_id=special.sep, pad_id=special.pad), special


def _consume(config: dict) -> None:
    """A Train worker: the loop's per-batch CPU work, timed after the first batch (which pays
    the streaming split's start-up)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from vidray.objectives.vlm import mask_batch

    cfg, per_worker, batches = config["cfg"], config["per_worker"], config["batches"]
    torch.set_num_threads(1)
    collate_fn, special = _collate_and_special(cfg)
    generator = torch.Generator().manual_seed(0)
    shard = ray.train.get_dataset_shard("train")
    seen, started = 0, None
    while seen < batches:
        for batch in shard.iter_torch_batches(batch_size=per_worker, collate_fn=collate_fn, drop_last=True):
            mask_batch(batch, cfg.objective, special, generator)
            if started is None:
                started = time.perf_counter()
                continue
            seen += 1
            if seen == batches:
                break
    rate = torch.tensor([batches * per_worker / (time.perf_counter() - started)], dtype=torch.float64)
    rates = [torch.zeros_like(rate) for _ in range(dist.get_world_size())] if dist.is_initialized() else [rate]
    if dist.is_initialized():
        dist.all_gather(rates, rate)
    if ray.train.get_context().get_world_rank() == 0:  # Ray Train v2 keeps metrics only with a checkpoint
        with open(config["out"], "w") as f:
            json.dump([float(r) for r in rates], f)


def _ingest(cfg, dataset, rows: int, workers: int, batches: int, storage: str) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vidray.train.job import repeat_for_steps

    per_worker = cfg.train.batch_size // workers
    out = os.path.join(storage, f"ingest-{workers}.json")
    os.makedirs(storage, exist_ok=True)
    data = repeat_for_steps(dataset, rows, cfg.train.batch_size, min_steps=batches + 2)
    trainer = TorchTrainer(_consume, train_loop_config={"cfg": cfg, "per_worker": per_worker, "batches": batches,
                                                          "out": out},
                           scaling_config=ScalingConfig(num_workers=workers),
                           run_config=RunConfig(name=f"ingest-{workers}-{time.time_ns()}", storage_path=storage),
                           datasets={"train": data})
    trainer.fit()
    with open(out) as f:
        return json.load(f)


def _model_consumption(cfg, dataset, step_batch: int) -> dict:
    """VLM-base: training FLOPs per example and the measured examples/s of a CPU step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vidray.train.vlm_system import build_system

    torch.set_num_threads(os.cpu_count() or 1)
    system = build_system(cfg, torch.device("cpu"))
    rows = next(iter(dataset.iter_batches(batch_size=step_batch, batch_format="numpy")))
    batch = system.collate(rows)
    model = system.model
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        system.training_step(system.prepare(batch))
    forward_flops = counter.get_total_flops() / step_batch
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    times = []
    for _ in range(4):  # the first step warms up allocators and kernels: dropped
        started = time.perf_counter()
        loss, _ = system.training_step(system.prepare(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "forward_gflops_per_example": forward_flops / 1e9,
            "cpu_examples_per_s": step_batch / step_s, "cpu_step_s": step_s,
            "h100_examples_per_s": MFU_TARGET * H100_BF16_DENSE_FLOPS / (3 * forward_flops)}


def _stage_rates(cfg, dataset, batch: int, batches: int) -> dict:
    """Examples/s of each stage alone, one after the other in this process (a profile: in a
    worker, Ray Data's format conversion and the collate run in prefetch threads beside the
    masking, so the stages overlap)."""
    import torch

    from vidray.objectives.vlm import mask_batch

    torch.set_num_threads(1)
    collate_fn, special = _collate_and_special(cfg)
    generator = torch.Generator().manual_seed(0)
    rows = []
    started = time.perf_counter()
    for numpy_batch in dataset.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True):
        rows.append(numpy_batch)
        if len(rows) == batches:
            break
    rates = {"ray_data_to_numpy": len(rows) * batch / (time.perf_counter() - started)}
    started = time.perf_counter()
    tensors = [collate_fn(r) for r in rows]
    rates["collate"] = len(rows) * batch / (time.perf_counter() - started)
    started = time.perf_counter()
    for t in tensors:
        mask_batch(t, cfg.objective, special, generator)
    rates["mask"] = len(rows) * batch / (time.perf_counter() - started)
    return rates


def run(args) -> dict:
    import ray

    from benchmarks.corpus import feature_sets
    from benchmarks.report import publish, versions
    from vidray.data.vlm import examples_dataset
    from vidray.train.job import repeat_for_steps, start_local_ray

    counts = [int(w) for w in args.workers.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="vidray-bench-ingest-")
    start_local_ray(num_cpus=4, log_to_driver=False)
    try:
        data = feature_sets(workdir, args.videos)
        cfg = _config(data, args.batch, 1)
        dataset = examples_dataset(cfg.data, cfg.model.max_video_tokens, seed=0).materialize()
        rows = dataset.count()
        ingest = {w: _ingest(_config(data, args.batch, w), dataset, rows, w, args.batches,
                             os.path.join(workdir, "runs")) for w in counts}
        stages = _stage_rates(cfg, repeat_for_steps(dataset, rows, args.batch, min_steps=20), args.batch, 20)
        model = _model_consumption(cfg, dataset, args.step_batch)
    finally:
        ray.shutdown()
    result = {"videos": args.videos, "rows": rows, "video_tokens": cfg.model.max_video_tokens,
              "text_tokens": cfg.data.max_text_tokens, "batch": args.batch, "batches": args.batches,
              "ingest": {str(w): {"per_worker": rates, "total": sum(rates)} for w, rates in ingest.items()},
              "stages": stages, **model, "versions": versions("ray", "torch", "pyarrow")}
    # The verdict reads one worker alone: a GPU worker has its own cores, while two workers here
    # share these 2 cores with each other and with Ray Data's tasks.
    alone = min(result["ingest"]["1"]["per_worker"]) if "1" in result["ingest"] else \
        min(min(v["per_worker"]) for v in result["ingest"].values())
    result["ingest_per_worker"] = alone
    result["ingest_over_h100"] = alone / model["h100_examples_per_s"]
    result["ingest_over_cpu_step"] = alone / model["cpu_examples_per_s"]
    publish("ingest", result, _markdown(result, args))
    return result


def _markdown(r: dict, args) -> str:
    command = (f"python -m benchmarks ingest --videos {r['videos']} --batch {r['batch']} --batches {r['batches']} "
               f"--workers {args.workers} --step-batch {args.step_batch}")
    lines = [
        "## ingest: Ray Data -> iter_torch_batches -> train loop, vs what VLM-base consumes",
        "",
        f"`{command}` — the pre-training examples of {r['videos']} synthetic videos ({r['rows']} rows, "
        f"repeated as `vidray pretrain` repeats a small set), global batch {r['batch']} split over the workers, "
        f"{r['batches']} timed batches per worker after the first; each batch collated ({r['video_tokens']} video "
        f"tokens, up to {r['text_tokens']} text tokens) and masked as the train loop does, one torch thread per "
        f"worker, no model. {r['versions']}.",
        "",
        "| consumer | examples/s per worker | examples/s in all |",
        "|---|---:|---:|",
    ]
    for workers, v in r["ingest"].items():
        per = ", ".join(f"{x:,.0f}" for x in v["per_worker"])
        lines.append(f"| Ray Data ingest, {workers} Train worker(s) | {per} | {v['total']:,.0f} |")
    lines += [
        f"| VLM-base ({r['params'] / 1e6:.0f} M parameters) training step on this CPU, batch {args.step_batch} "
        f"(measured: {r['cpu_step_s']:.2f} s per step) | {r['cpu_examples_per_s']:.1f} | |",
        f"| VLM-base on one H100 at {MFU_TARGET:.0%} MFU (derived: {3 * r['forward_gflops_per_example']:.1f} "
        f"training GFLOPs per example at {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s; no GPU lent) | "
        f"{r['h100_examples_per_s']:,.0f} | |",
        "",
        f"One worker ingests **{r['ingest_per_worker']:,.0f} examples/s, {r['ingest_over_h100']:.1f}x** what "
        f"VLM-base would consume per H100 at the MFU target ({'meets' if r['ingest_over_h100'] >= 2 else 'misses'} "
        f"the >= 2x target; derived from FLOPs until a GPU measures it) and {r['ingest_over_cpu_step']:,.0f}x what "
        "it consumes on this CPU. With 2 workers on these 2 cores each shares them with the other and with Ray "
        "Data's tasks, hence the lower rate per worker; a GPU node gives each worker cores of its own.",
        "",
        "Profile of the per-batch work, each stage alone on one thread (examples/s): "
        + ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in r["stages"].items())
        + f"; one after the other they would give {1 / sum(1 / v for v in r['stages'].values()):,.0f}/s. The "
        "worker does better because Ray Data formats and collates the next batches in background threads "
        f"while the loop masks. The slowest stage is {min(r['stages'], key=r['stages'].get).replace('_', ' ')}; "
        "if a GPU shows ingest short, pad examples to fixed shapes in the Ray Data map (tensor columns convert "
        "faster than ragged object columns, and the collate becomes one stack).",
    ]
    return "\n".join(lines)
