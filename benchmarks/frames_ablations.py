"""frames_ablations: All-in-one's temporal token rolling on vs off, held-out, 3+ seeds, 95% intervals.

The setting of `vidray demo --model allinone`: All-in-one (tiny, 64 px, 3 of the frames set's 4
frames per clip) pre-trains on the clean corpus's train split (MLM + video-text matching), then is
fine-tuned from that checkpoint for retrieval and for open-ended QA; both are scored on the
held-out test split. Each seed (``train.seed`` of every run; the corpus stays fixed) runs:

    default   temporal token rolling before every block of a joint pass (All-in-one's design)
    no_roll   model.temporal_roll=false in all three runs: the frames of a clip meet only in the
              final mean over frames

The direction questions ("which way does the red circle move?") are the ones one frame cannot
answer; rolling is All-in-one's way of letting frames see each other, so it should help them.
Fast retrieval encodes text and video in separate passes, where nothing rolls: rolling can reach
retrieval only through pre-training. Comparisons as in ``ablations`` (paired per seed, Student-t).
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.ablations import result_tables, start, summarize

VARIANTS = {"default": [], "no_roll": ["model.temporal_roll=false"]}
COMPARISONS = [("default", "no_roll", "rolling helps what one frame cannot answer (All-in-one)")]
COLUMNS = {"qa_temporal_accuracy": "direction QA", "qa_accuracy": "all QA", "t2v_R1": "t2v R@1",
           "t2v_R5": "t2v R@5", "t2v_MdR": "t2v MdR"}
# The demo's All-in-one steps: MLM learns within them, matching barely (README, the demo's tour).
STEPS = {"pretrain": 300, "retrieval": 200, "qa": 400}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=48, help="clean corpus videos (default 48, as `make demo`)")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--workdir", help="keep the corpus, frames set, runs and per-run results here (a rerun "
                   "reuses finished runs and adds to the table); default: a temp dir")


def corpus(workdir: str, videos: int) -> dict:
    """The clean corpus and its frames set (4 frames of 112 px per caption clip, as the demo's)."""
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import FramesExtractConfig
    from vidray.synth import SynthConfig, synthesize

    root = os.path.join(workdir, "corpus")
    manifest = os.path.join(root, "manifest.parquet")
    if not os.path.exists(manifest):
        synthesize(root, SynthConfig(videos=videos, seed=0), progress=False)
    frames = run_extract(ExtractConfig(manifest=manifest, root=os.path.join(workdir, "features"), extractor="frames",
                                       frames=FramesExtractConfig(num_frames=4, size=112)), progress=False)
    return {"manifest": manifest, "frames": frames["uri"], "qa": os.path.join(root, "qa.jsonl")}


def one_run(workdir: str, data: dict, variant: str, seed: int) -> dict:
    """Pre-train, fine-tune for retrieval and QA, evaluate both; saved so a rerun reuses them."""
    from vidray.config import load_config
    from vidray.frames.config import FramesFinetuneConfig, FramesPretrainConfig
    from vidray.frames.run import run_frames_finetune, run_frames_pretrain
    from vidray.train.config import EvaluateConfig
    from vidray.vlm.evaluate import run_evaluate

    saved = os.path.join(workdir, "results", f"{variant}-seed{seed}.json")
    if os.path.exists(saved):
        return json.loads(open(saved).read())
    tracking = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    common = ["model.arch=allinone", "model.flavour=tiny", "model.image_size=64", "model.num_frames=3",
              "model.max_text_tokens=32", f"data.frames={data['frames']}", f"data.manifest={data['manifest']}",
              "data.split=train", f"data.qa={data['qa']}", "train.num_workers=2", "train.log_every=100",
              f"train.storage_path={os.path.join(workdir, 'runs')}", "optim.lr=5e-4", "optim.warmup_steps=10",
              f"train.seed={seed}", f"mlflow.tracking_uri={tracking}", "mlflow.experiment=bench-frames-ablations",
              *VARIANTS[variant]]
    steps = STEPS["pretrain"]
    pretrain = run_frames_pretrain(load_config(FramesPretrainConfig, None, common + [
        f"train.steps={steps}", "train.batch_size=32", f"train.checkpoint_every={steps}",
        f"train.run_name=pretrain-{variant}-seed{seed}"]), say=lambda m: None)
    result = {"variant": variant, "seed": seed}
    for task, batch in (("retrieval", 32), ("qa", 16)):
        steps = STEPS[task]
        tuned = run_frames_finetune(load_config(FramesFinetuneConfig, None, common + [
            f"task={task}", f"init_from={pretrain['checkpoint']}", f"train.steps={steps}",
            f"train.checkpoint_every={steps}", f"train.batch_size={batch}",
            f"train.run_name={task}-{variant}-seed{seed}"]), say=lambda m: None)
        evaluation = EvaluateConfig(checkpoint=tuned["checkpoint"], split="test")
        evaluation.mlflow.tracking_uri, evaluation.mlflow.experiment = tracking, "bench-frames-ablations"
        metrics = run_evaluate(evaluation, say=lambda m: None)["metrics"]
        keep = (("t2v_R1", "t2v_R5", "t2v_MdR", "chance_R1", "examples") if task == "retrieval" else
                ("qa_accuracy", "qa_majority", "qa_temporal_accuracy", "qa_temporal_majority", "qa_questions"))
        result.update({k: metrics[k] for k in keep})
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        json.dump(result, f, indent=2)
    return result


def markdown(args, table: list[dict], comparisons: list[dict], first: dict, seeds: list[int]) -> str:
    lines = ["### All-in-one: temporal token rolling on vs off", "",
             f"`python -m benchmarks frames_ablations --videos {args.videos} --seeds {args.seeds} "
             f"--variants {args.variants}`", "",
             f"All-in-one (tiny, 64 px, 3 frames) on the {args.videos}-video clean corpus: pre-training "
             f"{STEPS['pretrain']} steps (MLM + matching), retrieval {STEPS['retrieval']} and open-ended QA "
             f"{STEPS['qa']} steps from it, scored on the held-out test split: {first['examples']} clips "
             f"(chance R@1 {first['chance_R1']:.3f}), {first['qa_questions']} questions (best constant answer "
             f"{first['qa_majority']:.3f}; on the direction questions {first['qa_temporal_majority']:.3f}). Mean ± 95% t-interval "
             f"over seeds {', '.join(map(str, seeds))}.", ""]
    return "\n".join(lines + result_tables(table, comparisons, COLUMNS))


def run(args) -> dict:
    from benchmarks.report import publish

    workdir, seeds, variants = start(args, VARIANTS, "vidray-bench-frames-ablations-")
    data = corpus(workdir, args.videos)
    for seed in seeds:
        for variant in variants:
            result = one_run(workdir, data, variant, seed)
            print(f"seed {seed} {variant}: " + ", ".join(f"{k} {result[k]:.3f}" for k in COLUMNS), flush=True)
    results = [json.loads(open(os.path.join(workdir, "results", name)).read())
               for name in sorted(os.listdir(os.path.join(workdir, "results")))]
    seeds = sorted({r["seed"] for r in results})
    table, comparisons = summarize(results, seeds, VARIANTS, COMPARISONS, COLUMNS)
    summary = {"workdir": workdir, "seeds": seeds, "results": results, "table": table, "comparisons": comparisons}
    publish("frames-ablations-allinone", summary, markdown(args, table, comparisons, results[0], seeds))
    return summary
