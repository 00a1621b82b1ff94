"""frames_ablations: the frames models' ablations (All-in-one rolling, E-ViLM MVM, LAVENDER multi-task), held-out, 3+ seeds.

The setting of `vidray demo --model ARCH`: the tiny model (64 px) pre-trains on the clean corpus's
train split, is fine-tuned from that checkpoint for retrieval and for open-ended QA, and both are
scored on the held-out test split. Each seed (``train.seed`` of every run; the corpus, and E-ViLM's
VQ tokenizers, stay fixed) runs every variant of ``--arch``:

    allinone  default   temporal token rolling before every block of a joint pass (All-in-one)
              no_roll   model.temporal_roll=false: the frames of a clip meet only in the final mean
    evilm     default   MVM on the codes of the semantic VQ tokenizer (E-ViLM)
              pixel     MVM on the codes of a pixel-reconstruction VQ tokenizer (the DALL-E-like control)
              no_mvm    MLM + matching only
    lavender  single    one fine-tuning run per task (retrieval, QA) from the pre-trained checkpoint
              multi     one run of both tasks through the one MLM head (task=multi), as many rows

The direction questions ("which way does the red circle move?") are the ones one frame cannot
answer. Fast retrieval (All-in-one, E-ViLM) encodes text and video in separate passes. Comparisons
as in ``ablations`` (paired per seed, Student-t). E-ViLM's two tokenizers are trained once (seed 0)
on the same frames and coded as vq feature sets: the variants differ in pre-training only.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.ablations import result_tables, start, summarize

# Plain-dict registry: arch -> its variants (overrides of every run), the paper's comparisons and
# the demo's frames per clip. LAVENDER's variants differ in fine-tuning, not in overrides.
ARCHS = {
    "allinone": {"variants": {"default": [], "no_roll": ["model.temporal_roll=false"]},
                 "comparisons": [("default", "no_roll", "rolling helps what one frame cannot answer (All-in-one)")],
                 "num_frames": 3, "title": "All-in-one: temporal token rolling on vs off"},
    "evilm": {"variants": {"default": ["objective.mvm_tokenizer=semantic"], "pixel": ["objective.mvm_tokenizer=pixel"],
                           "no_mvm": ["objective.mvm_tokenizer=none"]},
              "comparisons": [("default", "no_mvm", "MVM helps downstream (E-ViLM)"),
                              ("default", "pixel", "a semantic tokenizer beats a pixel one (E-ViLM)")],
              "num_frames": 4, "title": "E-ViLM: masked video modelling, semantic vs pixel tokenizer vs none"},
    "lavender": {"variants": {"single": [], "multi": []},
                 "comparisons": [("multi", "single", "one head for all tasks costs little (LAVENDER: within "
                                  "0.5 Meta-Ave)")],
                 "num_frames": 4, "title": "LAVENDER: multi-task vs single-task fine-tuning"},
}
COLUMNS = {"qa_temporal_accuracy": "direction QA", "qa_accuracy": "all QA", "t2v_R1": "t2v R@1",
           "t2v_R5": "t2v R@5", "t2v_MdR": "t2v MdR"}
# The demo's steps per arch (jobs/demo.py): MLM learns within them; LAVENDER's matching needs
# longer pre-training at 30% masking and a higher rate (the demo's overrides).
STEPS = {"pretrain": 300, "retrieval": 200, "qa": 400}
LAVENDER_STEPS = {"pretrain": 500, "retrieval": 400, "qa": 400}
EXTRA = {("lavender", "pretrain"): ["objective.mlm_prob=0.3", "optim.lr=1e-3"],
         ("lavender", "retrieval"): ["optim.lr=1e-3"],
         # One rate for both tasks (as LAVENDER's multi-task runs): the retrieval run's, the task
         # that needs it.
         ("lavender", "multi"): ["optim.lr=1e-3"]}
BATCH = {"pretrain": 32, "retrieval": 32, "qa": 16}
# LAVENDER's retrieval step fuses every pair of a worker's batch: the demo fine-tunes it at 16.
LAVENDER_BATCH = {**BATCH, "retrieval": 16}
VQ_STEPS = 150


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHS), default="allinone", help="the model whose ablation runs "
                   "(default allinone)")
    p.add_argument("--videos", type=int, default=48, help="clean corpus videos (default 48, as `make demo`)")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values (default 0,1,2)")
    p.add_argument("--variants", help="a subset of the arch's variants (default: all of them): "
                   + "; ".join(f"{a}: {', '.join(s['variants'])}" for a, s in ARCHS.items()))
    p.add_argument("--workdir", help="keep the corpus, feature sets, runs and per-run results here (a rerun "
                   "reuses finished runs and adds to the table); default: a temp dir")


def steps_of(arch: str) -> dict:
    return LAVENDER_STEPS if arch == "lavender" else STEPS


def batches_of(arch: str) -> dict:
    return LAVENDER_BATCH if arch == "lavender" else BATCH


def corpus(workdir: str, videos: int, arch: str) -> dict:
    """The clean corpus and its frames set (4 frames of 112 px per caption clip, as the demo's);
    for E-ViLM also the semantic and pixel tokenizers' vq sets."""
    from vidray.data.synth import SynthConfig, synthesize
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import FramesExtractConfig

    root = os.path.join(workdir, "corpus")
    manifest = os.path.join(root, "manifest.parquet")
    if not os.path.exists(manifest):
        synthesize(root, SynthConfig(videos=videos, seed=0), progress=False)
    features = os.path.join(workdir, "features")
    frames = run_extract(ExtractConfig(manifest=manifest, root=features, extractor="frames",
                                       frames=FramesExtractConfig(num_frames=4, size=112)), progress=False)
    data = {"manifest": manifest, "frames": frames["uri"], "qa": os.path.join(root, "qa.jsonl")}
    if arch == "evilm":
        data["vq"] = {kind: vq_codes(workdir, data, kind) for kind in ("semantic", "pixel")}
    return data


def vq_codes(workdir: str, data: dict, kind: str) -> str:
    """A VQ tokenizer of ``kind`` trained on the train split (the demo's settings), its codes of every
    clip cached as a vq feature set; the set's URI (reused when the run already finished)."""
    from vidray.config import load_config
    from vidray.config.frames import VQTokenizerConfig
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import VQExtractConfig
    from vidray.train.frames_run import run_train_vq

    cfg = load_config(VQTokenizerConfig, None, [
        f"model.kind={kind}", "model.flavour=tiny", "model.image_size=64", "model.num_frames=4", "model.patch=16",
        "model.codebook_size=256", "model.code_dim=16", "model.max_text_tokens=32", f"data.frames={data['frames']}",
        f"data.manifest={data['manifest']}", "data.split=train", f"train.steps={VQ_STEPS}", "train.batch_size=32",
        "train.num_workers=2", f"train.checkpoint_every={VQ_STEPS}", "train.log_every=50", "train.seed=0",
        f"train.storage_path={os.path.join(workdir, 'runs')}", f"train.run_name=vq-{kind}", "optim.lr=1e-3",
        "optim.warmup_steps=10", *tracking(workdir)])
    tokenizer = run_train_vq(cfg, say=lambda m: None)
    return run_extract(ExtractConfig(manifest=data["manifest"], root=os.path.join(workdir, "features"),
                                     extractor="vq", name=f"vq_{kind}", videos_per_part=8,
                                     vq=VQExtractConfig(checkpoint=tokenizer["checkpoint"], frames=data["frames"])),
                       progress=False)["uri"]


def tracking(workdir: str) -> list[str]:
    return [f"mlflow.tracking_uri=sqlite:///{os.path.join(workdir, 'mlflow.db')}",
            "mlflow.experiment=bench-frames-ablations"]


def one_run(workdir: str, data: dict, arch: str, variant: str, seed: int) -> dict:
    """Pre-train, fine-tune for retrieval and QA (LAVENDER multi: both in one run), evaluate; saved
    so a rerun reuses it."""
    from vidray.config import load_config
    from vidray.config.frames import FramesFinetuneConfig, FramesPretrainConfig
    from vidray.config.train import EvaluateConfig
    from vidray.eval.evaluate import run_evaluate
    from vidray.train.frames_run import run_frames_finetune, run_frames_pretrain

    saved = os.path.join(workdir, "results", f"{arch}-{variant}-seed{seed}.json")
    if os.path.exists(saved):
        return json.loads(open(saved).read())
    steps, batch = steps_of(arch), batches_of(arch)
    vq = [f"data.vq.{kind}={uri}" for kind, uri in data.get("vq", {}).items()]
    common = [f"model.arch={arch}", "model.flavour=tiny", "model.image_size=64",
              f"model.num_frames={ARCHS[arch]['num_frames']}", "model.max_text_tokens=32",
              f"data.frames={data['frames']}", f"data.manifest={data['manifest']}", "data.split=train",
              f"data.qa={data['qa']}", *vq, "train.num_workers=2", "train.log_every=100",
              f"train.storage_path={os.path.join(workdir, 'runs')}", "optim.lr=5e-4", "optim.warmup_steps=10",
              f"train.seed={seed}", *tracking(workdir)]
    overrides = ARCHS[arch]["variants"][variant]

    def train(config_class, runner, name: str, extra: list[str], n: int, batch: int) -> dict:
        # objective.* is pre-training's alone (fine-tuning has no such section); model.* goes to every run.
        applied = [o for o in overrides if config_class is FramesPretrainConfig or not o.startswith("objective.")]
        return runner(load_config(config_class, None, common + applied + extra + [
            f"train.steps={n}", f"train.batch_size={batch}", f"train.checkpoint_every={n}",
            f"train.run_name={arch}-{name}-seed{seed}"]), say=lambda m: None)

    # LAVENDER's variants share the pre-training of their seed (they differ in fine-tuning only).
    pretrain_name = "pretrain" if arch == "lavender" else f"pretrain-{variant}"
    shared = os.path.join(workdir, "results", "pretrain", f"{arch}-{pretrain_name}-seed{seed}.json")
    if os.path.exists(shared):
        pretrain = json.loads(open(shared).read())
    else:
        pretrain = train(FramesPretrainConfig, run_frames_pretrain, pretrain_name, EXTRA.get((arch, "pretrain"), []),
                         steps["pretrain"], batch["pretrain"])
        os.makedirs(os.path.dirname(shared), exist_ok=True)
        with open(shared, "w") as f:
            json.dump({"checkpoint": pretrain["checkpoint"]}, f)
    if variant == "multi":
        # As many rows as the single-task runs together, at the retrieval run's batch.
        rows = steps["retrieval"] * batch["retrieval"] + steps["qa"] * batch["qa"]
        runs = [train(FramesFinetuneConfig, run_frames_finetune, "multi",
                      ["task=multi", "tasks=[retrieval,qa]", f"init_from={pretrain['checkpoint']}",
                       *EXTRA.get((arch, "multi"), [])],
                      rows // batch["retrieval"], batch["retrieval"])]
    else:
        runs = [train(FramesFinetuneConfig, run_frames_finetune, f"{task}-{variant}",
                      [f"task={task}", f"init_from={pretrain['checkpoint']}", *EXTRA.get((arch, task), [])],
                      steps[task], batch[task]) for task in ("retrieval", "qa")]
    metrics: dict = {}
    for tuned in runs:
        evaluation = EvaluateConfig(checkpoint=tuned["checkpoint"], split="test")
        evaluation.mlflow.tracking_uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
        evaluation.mlflow.experiment = "bench-frames-ablations"
        scores = run_evaluate(evaluation, say=lambda m: None)["metrics"]
        # A multi run counts every task's examples in `examples` and the clips in `retrieval_examples`.
        retrieval_clips = scores.get("retrieval_examples", scores["examples"]) if "t2v_R1" in scores else None
        metrics.update(scores)
        if retrieval_clips is not None:
            metrics["retrieval_clips"] = retrieval_clips
    metrics["examples"] = metrics.pop("retrieval_clips")
    keep = ("t2v_R1", "t2v_R5", "t2v_MdR", "chance_R1", "examples", "qa_accuracy", "qa_majority",
            "qa_temporal_accuracy", "qa_temporal_majority", "qa_questions")
    result = {"arch": arch, "variant": variant, "seed": seed, **{k: metrics[k] for k in keep}}
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        json.dump(result, f, indent=2)
    return result


def saved_results(workdir: str, arch: str) -> list[dict]:
    """Every result of ``arch`` saved in ``workdir``, whichever invocation ran it."""
    folder = os.path.join(workdir, "results")
    return [json.loads(open(os.path.join(folder, name)).read()) for name in sorted(os.listdir(folder))
            if name.startswith(f"{arch}-") and name.endswith(".json")]


def markdown(args, table: list[dict], comparisons: list[dict], first: dict, seeds: list[int]) -> str:
    steps = steps_of(args.arch)
    lines = [f"### {ARCHS[args.arch]['title']}", "",
             f"`python -m benchmarks frames_ablations --arch {args.arch} --videos {args.videos} "
             f"--seeds {','.join(map(str, seeds))}`", "",
             f"{args.arch} (tiny, 64 px, {ARCHS[args.arch]['num_frames']} frames) on the {args.videos}-video clean "
             f"corpus: pre-training {steps['pretrain']} steps, retrieval {steps['retrieval']} and open-ended QA "
             f"{steps['qa']} steps from it, scored on the held-out test split: {first['examples']} clips "
             f"(chance R@1 {first['chance_R1']:.3f}), {first['qa_questions']} questions (best constant answer "
             f"{first['qa_majority']:.3f}; on the direction questions {first['qa_temporal_majority']:.3f}). "
             f"Mean ± 95% t-interval over seeds {', '.join(map(str, seeds))}.", ""]
    if args.arch == "lavender":
        batch = batches_of(args.arch)
        rows = steps["retrieval"] * batch["retrieval"] + steps["qa"] * batch["qa"]
        lines[-1:-1] = ["", f"Batches: retrieval {batch['retrieval']}, QA {batch['qa']}; `multi` fine-tunes once on both "
                        f"tasks through the MLM head for {rows // batch['retrieval']} steps of "
                        f"{batch['retrieval']} (as many rows as the two single-task runs together) at the retrieval run's "
                        "rate."]
    return "\n".join(lines + result_tables(table, comparisons, COLUMNS))


def run(args) -> dict:
    from benchmarks.report import publish

    spec = ARCHS[args.arch]
    args.variants = args.variants or ",".join(spec["variants"])
    workdir, seeds, variants = start(args, spec["variants"], "vidray-bench-frames-ablations-")
    data = corpus(workdir, args.videos, args.arch)
    for seed in seeds:
        for variant in variants:
            result = one_run(workdir, data, args.arch, variant, seed)
            print(f"seed {seed} {args.arch} {variant}: " + ", ".join(f"{k} {result[k]:.3f}" for k in COLUMNS),
                  flush=True)
    results = saved_results(workdir, args.arch)
    seeds = sorted({r["seed"] for r in results})
    table, comparisons = summarize(results, seeds, spec["variants"], spec["comparisons"], COLUMNS)
    summary = {"workdir": workdir, "seeds": seeds, "results": results, "table": table, "comparisons": comparisons}
    publish(f"frames-ablations-{args.arch}", summary, markdown(args, table, comparisons, results[0], seeds))
    return summary
