"""padding: VLM steps on batches padded to their longest example vs to the model's maxima.

`vidray.data.vlm.collate` pads a batch to its longest video and text; before, it padded every
batch to ``model.max_video_tokens`` video slots and ``max_text_tokens`` text slots (97 in all).
Both loops here run the same system, the same batches and the same Adam step on one process with
one torch thread (a 1-CPU Train worker's share); the fully padded batches are the same batches
with empty slots appended, what the old collate made, so the slot count is the only difference.
Pre-training (MMM + masked token loss over spans of captions) and retrieval fine-tuning (one
caption per clip) each, from all-MiniLM-L6-v2 as the demo runs them.
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.ray_overhead import WARM_STEPS, collated_batches, timed_steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=24, help="synthetic videos (default 24)")
    p.add_argument("--backbone", default="minilm", help="model.text_backbone: minilm (the demo's) or none "
                   "(the tiny random BERT)")
    p.add_argument("--batch", type=int, default=8, help="examples a step: one of the demo's 2 workers (default 8)")
    p.add_argument("--steps", type=int, default=12, help="timed steps a loop (default 12)")
    p.add_argument("--workdir", help="keep corpus and features here (default: a temp dir)")


def _overrides(args, data: dict) -> list[str]:
    backbone = [] if args.backbone == "none" else [f"model.text_backbone={args.backbone}"]
    return [*backbone, f"data.features={data['s3d']}", f"data.text={data['text']}",
            f"train.batch_size={args.batch}", f"train.steps={args.steps + WARM_STEPS}", "train.num_workers=1"]


def fully_padded(batch: dict, video_slots: int, text_slots: int) -> dict:
    """``batch`` with empty slots appended up to the model's widths: what collate made before."""
    import torch.nn.functional as F

    v, t = video_slots - batch["video"].shape[1], text_slots - batch["text_ids"].shape[1]
    return {"video": F.pad(batch["video"], (0, 0, 0, v)), "video_mask": F.pad(batch["video_mask"], (0, v)),
            "text_ids": F.pad(batch["text_ids"], (0, t)), "text_mask": F.pad(batch["text_mask"], (0, t))}


def _seconds_per_step(build, cfg, batches: list[dict]) -> float:
    """Mean seconds of a training step after the warm steps, on a freshly built system."""
    import torch

    torch.manual_seed(cfg.train.seed)
    times = timed_steps(build(cfg, torch.device("cpu")), batches, cfg)
    return sum(times[WARM_STEPS:]) / len(times[WARM_STEPS:])


def _compare(phase: str, build, cfg, batches: list[dict], video_slots: int, text_slots: int) -> dict:
    full = [fully_padded(b, video_slots, text_slots) for b in batches]
    slots = [b["video"].shape[1] + b["text_ids"].shape[1] + 2 for b in batches]
    longest = _seconds_per_step(build, cfg, batches)
    padded = _seconds_per_step(build, cfg, full)
    return {"phase": phase, "slots": sum(slots) / len(slots), "full_slots": video_slots + text_slots + 2,
            "longest_ms": 1000 * longest, "full_ms": 1000 * padded, "speedup": padded / longest}


def run(args) -> dict:
    import ray
    import torch

    from benchmarks.corpus import feature_sets
    from benchmarks.report import publish, versions
    from vidray.config import load_config
    from vidray.config.train import FinetuneConfig, PretrainConfig
    from vidray.data.vlm import examples_dataset, finetune_dataset, text_budget, with_video_dim
    from vidray.train import vlm_finetune, vlm_system
    from vidray.train.job import start_local_ray

    torch.set_num_threads(1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vidray-bench-padding-")
    start_local_ray(num_cpus=4, log_to_driver=False)
    count = args.steps + WARM_STEPS
    try:
        data = feature_sets(workdir, args.videos)
        pre = with_video_dim(load_config(PretrainConfig, None, [*_overrides(args, data), "data.clips_per_video=16"]),
                             data["s3d"])
        system = vlm_system.build_system(pre, torch.device("cpu"))
        pre_batches = collated_batches(system, examples_dataset(pre.data, pre.model.max_video_tokens).materialize(),
                                       count, args.batch)
        ft = with_video_dim(load_config(FinetuneConfig, None, [*_overrides(args, data), "task=retrieval"]),
                            data["s3d"])
        ft_batches = collated_batches(vlm_finetune.build_system(ft, torch.device("cpu")),
                                      finetune_dataset(ft).materialize(), count, args.batch)
    finally:
        ray.shutdown()
    rows = [_compare("pre-training", vlm_system.build_system, pre, pre_batches, pre.model.max_video_tokens,
                     pre.data.max_text_tokens + 1),
            _compare("retrieval fine-tuning", vlm_finetune.build_system, ft, ft_batches, ft.model.max_video_tokens,
                     text_budget(ft.model) + 1)]
    result = {"videos": args.videos, "backbone": args.backbone, "batch": args.batch, "steps": args.steps,
              "rows": rows, "versions": versions("torch")}
    publish("padding", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    command = (f"python -m benchmarks padding --videos {r['videos']} --backbone {r['backbone']} "
               f"--batch {r['batch']} --steps {r['steps']}")
    lines = [
        "## padding: VLM batches padded to their longest example vs to the model's maxima",
        "",
        f"`{command}` — VLM from `{r['backbone']}`, {r['batch']} examples a step (one worker of the demo's "
        f"two), one torch thread, the mean of {r['steps']} steps after {WARM_STEPS} warm ones; the same "
        f"batches each way, the fully padded ones with empty slots appended (what `collate` made before). "
        f"{r['versions']}.",
        "",
        "| phase | slots a batch (padded to its longest) | fully padded | step, longest | step, fully padded | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {x['phase']} | {x['slots']:.1f} | {x['full_slots']} | {x['longest_ms']:.0f} ms | "
              f"{x['full_ms']:.0f} ms | **{x['speedup']:.2f}x** |" for x in r["rows"]]
    lines += ["", "Every valid slot's state is the same either way (`tests/test_vlm_model.py::"
              "test_a_batch_padded_to_its_longest_computes_what_the_fully_padded_one_does`); only the "
              "padding's compute goes."]
    return "\n".join(lines)
