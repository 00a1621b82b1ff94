"""frames_ingest: the frames set -> Ray Data -> iter_torch_batches at 224 px, vs what All-in-one-base and LAVENDER-base consume.

The frames models train on clips of JPEG frames (the ``frames`` feature set), so their CPU cost per
example is decoding and resizing those JPEGs in the Ray Data map (:func:`vidray.data.frames.clip_examples`),
then the collate. Measured here per CPU core, at 3 and 8 frames per clip:

- the decode stage alone on one thread (the map's work per clip: JPEG decode, resize, tokenize);
- the whole path as training reads it: ``examples_dataset`` (Ray Data tasks on every core) ->
  ``iter_torch_batches`` with the frames collate, in one consumer, divided by the cores it ran on.

What a GPU consumes is derived until a GPU is lent: the model's training FLOPs per clip (3x a
joint forward pass, torch's FLOP counter on the base flavour) at 40% MFU on an H100 (989 TFLOP/s
dense bf16). Cores per GPU = that rate over the per-core rate; the target: one GPU node's CPU
share (24 cores per GPU) feeds at least 2x the GPU's demand.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.ingest import H100_BF16_DENSE_FLOPS, MFU_TARGET

CORES_PER_GPU = 24   # a GPU node's CPU share: 192 vCPUs over 8 H100s (p5.48xlarge)
MODELS = {3: "allinone", 8: "lavender"}   # the frames per clip each paper's base model trains on here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=48, help="synthetic videos (default 48)")
    p.add_argument("--size", type=int, default=224, help="frame size the models read, px (default 224)")
    p.add_argument("--stored", type=int, default=256, help="JPEG size in the frames set, px (default 256)")
    p.add_argument("--batch", type=int, default=32, help="batch of the consumer (default 32)")
    p.add_argument("--passes", type=int, default=4, help="reads of the set in the timed run (default 4)")
    p.add_argument("--workdir", help="keep corpus and features here (default: a temp dir)")


def _model(arch: str, frames: int, size: int, flavour: str = "base"):
    from vidray.config.frames import FramesModelConfig

    return FramesModelConfig(arch=arch, flavour=flavour, num_frames=frames, image_size=size)


def _data(data: dict):
    from vidray.config.frames import FramesDataConfig

    return FramesDataConfig(frames=data["frames"], manifest="", split="train")


def _jpeg_kb(data: dict) -> float:
    """Mean size of one stored JPEG frame, KB (what a clip costs on storage, per frame)."""
    from vidray.feature_store.store import open_version, read_parquet

    frames = [len(jpeg) for uri in open_version(data["frames"]).part_uris
              for clip in read_parquet(uri, columns=["jpeg"])["jpeg"].to_pylist() for jpeg in clip]
    return sum(frames) / len(frames) / 1024


def _decode_rate(data: dict, model, rows: int = 64) -> float:
    """Clips/s of the map's work on one thread: JPEG decode + resize + tokenize."""
    import torch

    from vidray.data.frames import CLIP_COLUMNS, clip_examples, example_kwargs
    from vidray.feature_store.store import open_version, read_parquet

    torch.set_num_threads(1)
    table = read_parquet(open_version(data["frames"]).part_uris[0], columns=CLIP_COLUMNS).slice(0, rows)
    kwargs = {**example_kwargs(model, _data(data), "train"), "keep": None}
    clip_examples(table.slice(0, 2), **kwargs)  # the tokenizer's first load, not timed
    started = time.perf_counter()
    examples = clip_examples(table, **kwargs)
    return len(examples) / (time.perf_counter() - started)


def _pipeline_rate(data: dict, model, batch: int, passes: int) -> dict:
    """Examples/s of the whole path in one consumer, the Ray Data tasks on every core, from the
    first batch on (Ray Data's start-up left out, as a long epoch amortises it). The set is read
    ``passes`` times in one dataset, each read decoding its JPEGs again, as every epoch does."""
    from functools import partial

    from vidray.data.frames import collate, examples_dataset
    from vidray.models.weights import text_tokenizer

    tok = text_tokenizer(model.tokenizer)
    collate_fn = partial(collate, max_text_tokens=model.max_text_tokens, pad_id=tok.pad_token_id)
    read = lambda: examples_dataset(model, _data(data), "train", say=lambda m: None)  # noqa: E731
    dataset = read()
    for _ in range(passes - 1):
        dataset = dataset.union(read())
    seen, started = 0, None
    for tensors in dataset.iter_torch_batches(batch_size=batch, collate_fn=collate_fn):
        assert tuple(tensors["frames"].shape[1:]) == (model.num_frames, 3, model.image_size, model.image_size)
        if started is None:
            started = time.perf_counter()
            continue
        seen += len(tensors["frames"])
    return {"examples": seen, "seconds": time.perf_counter() - started}


def _demand(arch: str, frames: int, size: int) -> dict:
    """Training GFLOPs per clip of the base flavour and the clips/s one H100 takes at the MFU target."""
    import torch

    from vidray.models.build import size_figures

    torch.set_num_threads(os.cpu_count() or 1)
    figures = size_figures(_model(arch, frames, size))
    training_flops = 3 * figures["model.gflops_per_clip"] * 1e9
    return {"params": figures["model.parameters"], "training_gflops_per_clip": training_flops / 1e9,
            "h100_clips_per_s": MFU_TARGET * H100_BF16_DENSE_FLOPS / training_flops}


def run(args) -> dict:
    import ray

    from benchmarks.corpus import frames_set
    from benchmarks.report import publish, versions
    from vidray.train.job import start_local_ray

    workdir = args.workdir or tempfile.mkdtemp(prefix="vidray-bench-frames-ingest-")
    cores = os.cpu_count() or 1
    start_local_ray(num_cpus=cores, log_to_driver=False)
    try:
        data = frames_set(workdir, args.videos, max(MODELS), args.stored)
        rows = {}
        for frames, arch in MODELS.items():
            model = _model(arch, frames, args.size, flavour="tiny")   # the data path does not depend on size
            pipeline = _pipeline_rate(data, model, args.batch, args.passes)
            rows[frames] = {"arch": arch, "decode_per_core": _decode_rate(data, model),
                            "pipeline": pipeline, "pipeline_per_core": pipeline["examples"] / pipeline["seconds"] / cores,
                            **_demand(arch, frames, args.size)}
    finally:
        ray.shutdown()
    for row in rows.values():
        per_core = min(row["decode_per_core"], row["pipeline_per_core"])
        row["cores_per_gpu"] = row["h100_clips_per_s"] / per_core
        row["node_share_over_demand"] = CORES_PER_GPU * per_core / row["h100_clips_per_s"]
    result = {"videos": args.videos, "size": args.size, "stored": args.stored, "batch": args.batch,
              "jpeg_kb_per_frame": _jpeg_kb(data),
              "passes": args.passes, "cores": cores, "rows": {str(k): v for k, v in rows.items()},
              "versions": versions("ray", "torch", "pillow", "pyarrow")}
    publish("frames_ingest", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    command = (f"python -m benchmarks frames_ingest --videos {r['videos']} --size {r['size']} --stored {r['stored']} "
               f"--batch {r['batch']} --passes {r['passes']}")
    names = {"allinone": "All-in-one-base", "lavender": "LAVENDER-base"}
    lines = [
        "## frames_ingest: frames set -> Ray Data -> iter_torch_batches at 224 px, vs what the frames models consume",
        "",
        f"`{command}` — the `frames` set of {r['videos']} synthetic videos (JPEG frames stored at {r['stored']} px), "
        f"read at {r['size']} px: the decode stage alone on one thread, and the whole path (Ray Data tasks on all "
        f"{r['cores']} cores -> `iter_torch_batches` with the frames collate, one consumer, {r['passes']} reads of "
        f"the set in one dataset, timed from the first batch) divided by the cores. GPU demand derived from the base flavour's FLOPs (3x a joint forward) "
        f"at {MFU_TARGET:.0%} MFU on an H100 ({H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s); no GPU lent. {r['versions']}.",
        "",
        "| frames per clip | model (base) | decode, clips/s per core | whole path, clips/s per core | training GFLOPs per clip | H100 demand, clips/s | cores per GPU | 24 cores / demand |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for frames, row in r["rows"].items():
        lines.append(f"| {frames} | {names[row['arch']]} ({row['params'] / 1e6:.0f} M) | {row['decode_per_core']:,.0f} | "
                     f"{row['pipeline_per_core']:,.0f} | {row['training_gflops_per_clip']:,.0f} | "
                     f"{row['h100_clips_per_s']:,.0f} | {row['cores_per_gpu']:.1f} | "
                     f"**{row['node_share_over_demand']:.1f}x** |")
    verdicts = [f"{names[row['arch']]} at {frames} frames {'meets' if row['node_share_over_demand'] >= 2 else 'misses'} "
                f"it ({row['node_share_over_demand']:.1f}x)" for frames, row in r["rows"].items()]
    lines += ["", f"Target: a GPU node's {CORES_PER_GPU} cores per GPU feed at least 2x the GPU's demand. "
              + "; ".join(verdicts) + ". Cores per GPU uses the slower of the two per-core rates. A stored frame "
              f"takes {r['jpeg_kb_per_frame']:.1f} KB (JPEG q90 at {r['stored']} px; synthetic frames compress better "
              "than footage). Training FLOPs are counted as torch counts them, 2 per multiply-add: All-in-one-B's "
              "joint forward at 3 frames counts 121 G here against the paper's 58.7 G, which counts multiply-adds."]
    return "\n".join(lines)
