"""The jobs of the frames models: pre-training, fine-tuning and evaluation (``vidray pretrain|
finetune|evaluate`` dispatch here when ``model.arch`` is a frames model).

Same loop, checkpoints and MLflow runs as VLM (:mod:`vidray.train.job`); the runs also carry the
model's size figures (parameters, forward GFLOPs per clip) as params.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from vidray.config import ConfigError, from_dict
from vidray.data.frames import (VQCodes, answer_vocabulary, clip_keys, examples_dataset, read_examples,
                                read_clip_rows, read_mc, read_qa, skipped_videos_uri, source_tags,
                                with_task_columns)
from vidray.data.manifest import split_videos
from vidray.eval.frames import scorer_of
from vidray.eval.multiple_choice import mc_row, mc_summary
from vidray.eval.report import bar_figure, log_evaluation, recall_curve_figure
from vidray.eval.retrieval import score_retrieval
from vidray.models.build import measure_size, size_figures
from vidray.models.vq import VQ_FLAVOURS, VQTokenizer
from vidray.models.weights import text_tokenizer
from vidray.train.config import EvaluateConfig
from vidray.train.frames_config import FINETUNE_TASKS, FramesFinetuneConfig, FramesPretrainConfig
from vidray.train.frames_system import (VQTrainSystem, build_finetune_system, build_pretrain_system, finetuned_model,
                                        mvm_settings)
from vidray.train.job import run_name, run_training

PRETRAIN_EXPERIMENT, FINETUNE_EXPERIMENT, EVALUATE_EXPERIMENT = (
    "vidray-pretrain", "vidray-finetune", "vidray-evaluate")
# The synthetic corpus's question types; "direction" needs two frames (temporal modelling).
TEMPORAL_TYPES = ("direction",)


def run_frames_pretrain(cfg: FramesPretrainConfig, say=print, tags: dict | None = None,
                        callbacks: tuple = ()) -> dict[str, Any]:
    if cfg.train.val_every and not cfg.data.manifest:
        raise ConfigError("data.manifest", "is required with train.val_every > 0: it names the videos "
                          "of data.val_split")
    tags = {**source_tags(cfg.data), "arch": cfg.model.arch, **(tags or {})}
    mvm = mvm_settings(cfg)
    if mvm:
        tags.update({"feature_set.vq": mvm["uri"], "mvm_tokenizer": cfg.objective.mvm_tokenizer})
    figures = size_figures(cfg.model)
    say(f"{cfg.model.arch} ({cfg.model.flavour}): {figures['model.parameters']:,} parameters, "
        f"{figures['model.gflops_per_clip']} GFLOPs per clip"
        + (f"; MVM on {mvm['kind']} VQ codes ({mvm['codebook_size']} codes)" if mvm else ""))
    codes = []  # the codes go to the object store once Ray is up, shared by both datasets
    name = run_name(cfg, cfg.model.arch, "pretrain")

    def dataset(split: str):
        if mvm and not codes:
            codes.append(shared_vq_codes(mvm["uri"], cfg.model, cfg.data, say))
        return examples_dataset(cfg.model, cfg.data, split, vq=codes[0] if codes else None, say=say,
                                skipped_to=skipped_videos_uri(cfg.train.storage_path, name, split))

    return run_training(cfg, job="pretrain", experiment=cfg.mlflow.experiment or PRETRAIN_EXPERIMENT,
                        run_name=name, build_system=build_pretrain_system,
                        make_dataset=lambda: dataset(cfg.data.split),
                        make_val_dataset=lambda: dataset(cfg.data.val_split),
                        tags=tags, params=figures, callbacks=callbacks, say=say)


def shared_vq_codes(vq_uri: str, model, data, say=print):
    """The vq set's codes in Ray's object store (one copy per node), after checking that they
    cover the clips of the data (the frames set's, or the manifest's with data.source=videos):
    clips without codes would silently drop out of pre-training."""
    import ray

    codes = VQCodes.read(vq_uri)
    clips = clip_keys(model, data)
    missing = [k for k in clips if codes.get(*k) is None]
    if missing:
        source = data.frames if data.source == "frames" else data.manifest
        say(f"warning: {len(missing)} of {len(clips)} clips of {source} have no codes in {vq_uri} "
            f"(e.g. {missing[0][0]} clip {missing[0][1]}); they are left out of pre-training. Was the vq "
            "set extracted from a frames set of the same manifest?")
    return ray.put(codes)


def with_answers(cfg: FramesFinetuneConfig) -> FramesFinetuneConfig:
    """``cfg`` with ``answers`` filled from the training split's questions when empty (qa)."""
    if "qa" not in cfg.trained_tasks() or cfg.answers:
        return cfg
    answers = answer_vocabulary(read_qa(cfg.data.qa), split_videos(cfg.data.manifest, cfg.data.split))
    if not answers:
        raise ConfigError("data.qa", f"{cfg.data.qa} has no question about a video of split {cfg.data.split!r}")
    return dataclasses.replace(cfg, answers=answers)


def run_frames_finetune(cfg: FramesFinetuneConfig, say=print, tags: dict | None = None) -> dict[str, Any]:
    cfg.validate()  # a config built in code skips from_dict's check
    cfg = with_answers(cfg)
    tasks = cfg.trained_tasks()
    qa = read_qa(cfg.data.qa) if "qa" in tasks else None
    mc = read_mc(cfg.data.mc) if "mc" in tasks else None
    tags = {**source_tags(cfg.data), "arch": cfg.model.arch, "task": cfg.task,
            **({"tasks": ",".join(tasks)} if cfg.task == "multi" else {}),
            "init_from": str(cfg.init_from), **(tags or {})}
    figures = size_figures(cfg.model, len(cfg.answers))
    name = run_name(cfg, cfg.model.arch, cfg.task)
    skipped_to = skipped_videos_uri(cfg.train.storage_path, name, cfg.data.split)
    report = run_training(cfg, job="finetune", experiment=cfg.mlflow.experiment or FINETUNE_EXPERIMENT,
                          run_name=name, build_system=build_finetune_system,
                          make_dataset=lambda: finetune_dataset(cfg, qa, mc, skipped_to=skipped_to, say=say),
                          tags=tags, params=figures, say=say)
    return {**report, "task": cfg.task}


def finetune_dataset(cfg: FramesFinetuneConfig, qa: dict | None, mc: dict | None, **source):
    """The training examples of the run's task. task=multi: every task's examples in one dataset,
    each row tagged with its task and carrying every task's columns (:func:`with_task_columns`),
    shuffled once: the loop reads rows in order, so unshuffled the tasks would come one after the
    other instead of mixed in every batch. Each task's share of a batch is its share of the rows."""
    per_task = {"retrieval": {}, "qa": {"qa": qa, "answers": cfg.answers}, "mc": {"mc": mc}}
    if cfg.task != "multi":
        return examples_dataset(cfg.model, cfg.data, cfg.data.split, **per_task[cfg.task], **source)
    parts = [examples_dataset(cfg.model, cfg.data, cfg.data.split, **per_task[task], **source)
             .map_batches(with_task_columns, batch_format="numpy", fn_kwargs={"task": FINETUNE_TASKS.index(task)})
             for task in cfg.tasks]
    return parts[0].union(*parts[1:]).random_shuffle(seed=cfg.train.seed)


# --- evaluation -----------------------------------------------------------------------------------

def load_frames_finetuned(state: dict) -> tuple[FramesFinetuneConfig, torch.nn.Module]:
    cfg = from_dict(FramesFinetuneConfig, state["config"])
    model = finetuned_model(cfg)
    model.load_state_dict(state["model"])
    return cfg, model.eval()


def _majority(answers: list[str]) -> float:
    """Accuracy of the best constant answer on these questions (a baseline above 1 / answers)."""
    return max(answers.count(a) for a in set(answers)) / len(answers) if answers else float("nan")


def evaluate_qa(predicted: list[str], examples: list[dict],
                answers: list[str]) -> tuple[dict, list[dict], dict[str, float]]:
    """Accuracy over every question (answers outside the vocabulary count wrong), per question
    type, and ``qa_temporal_accuracy`` on the direction questions, each next to its baselines."""
    table = [{"video_id": e["video_id"], "question": e["text"], "type": e["question_type"] or "",
              "answer": e["answer_text"], "predicted": p, "correct": p == e["answer_text"]}
             for e, p in zip(examples, predicted)]
    metrics = {"qa_accuracy": float(np.mean([r["correct"] for r in table])),
               "qa_chance": 1.0 / len(answers), "qa_majority": _majority([r["answer"] for r in table]),
               "qa_questions": len(table),
               "qa_out_of_vocabulary": sum(r["answer"] not in answers for r in table)}
    per_type: dict[str, float] = {}
    for kind in sorted({r["type"] for r in table if r["type"]}):
        rows = [r for r in table if r["type"] == kind]
        per_type[kind] = metrics[f"qa_{kind}_accuracy"] = float(np.mean([r["correct"] for r in rows]))
        metrics[f"qa_{kind}_majority"] = _majority([r["answer"] for r in rows])
    temporal = [r for r in table if r["type"] in TEMPORAL_TYPES]
    if temporal:
        metrics["qa_temporal_accuracy"] = float(np.mean([r["correct"] for r in temporal]))
        metrics["qa_temporal_majority"] = _majority([r["answer"] for r in temporal])
    return metrics, table, per_type


def evaluate_mc(scores: np.ndarray, examples: list[dict]) -> tuple[dict, list[dict]]:
    """Per MC question (its options' examples): the option scoring highest is picked; ties count
    against the model. ``mc_accuracy`` next to ``mc_chance`` (1 / options), as VLM's evaluation."""
    questions: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        questions.setdefault(e["mc_key"], []).append(i)
    table, option_counts = [], []
    for rows in questions.values():
        options = [examples[i] for i in rows]
        right = [e["option_index"] for e in options].index(options[0]["mc_answer"])
        table.append(mc_row(options[0]["video_id"], options[0]["question"], [e["text"] for e in options],
                            scores[rows], right))
        option_counts.append(len(rows))
    return mc_summary(table, option_counts), table


def run_frames_evaluate(cfg: EvaluateConfig, state: dict, say: Callable[[str], None] = print,
                        tags: dict | None = None) -> dict[str, Any]:
    """Evaluate a frames model's fine-tuning checkpoint (``state`` already loaded): every task it
    was trained on (task=multi: each of ``tasks``) in one MLflow run; a retrieval checkpoint with
    ``mc=FILE`` also scores multiple choice through retrieval, as VLM's evaluation does."""
    ft, model = load_frames_finetuned(state)
    # frames= names a frames set to score on, even for a checkpoint trained with data.source=videos.
    data = dataclasses.replace(ft.data, source="frames" if cfg.frames else ft.data.source,
                               frames=cfg.frames or ft.data.frames, manifest=cfg.manifest or ft.data.manifest,
                               qa=cfg.qa or ft.data.qa, mc=cfg.mc or ft.data.mc)
    tasks = ft.trained_tasks()
    rows = read_clip_rows(ft.model, data, cfg.split, say)  # once for every task (decoding included)
    metrics, tables, figures, counts = {}, {}, {}, {}
    for task in tasks:
        task_metrics, counts[task] = evaluate_task(task, model, ft, data, cfg, rows, tables, figures, say)
        metrics.update(task_metrics)
    if tasks == ["retrieval"] and cfg.mc:  # the option alone against the clip, as a caption
        task_metrics, _ = evaluate_task("mc", model, ft, data, cfg, rows, tables, figures, say, mc_question=False)
        metrics.update(task_metrics)
    metrics["examples"] = sum(counts.values())
    if len(tasks) > 1:
        metrics.update({f"{task}_examples": n for task, n in counts.items()})
    # The data it read, resolved: the params of the run name it (empty meant "the checkpoint's").
    cfg = dataclasses.replace(cfg, frames=data.frames, manifest=data.manifest, qa=data.qa, mc=data.mc)
    run_id = log_evaluation(cfg, ft, metrics, tables, figures, {}, {"arch": ft.model.arch, **(tags or {})})
    say(f"evaluate {ft.model.arch} {ft.task} on {cfg.split}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)) + f"; MLflow run {run_id}")
    return {"task": ft.task, "split": cfg.split, "metrics": metrics, "mlflow_run_id": run_id,
            "checkpoint": cfg.checkpoint}


def evaluate_task(task: str, model, ft: FramesFinetuneConfig, data, cfg: EvaluateConfig, rows, tables: dict,
                  figures: dict, say: Callable[[str], None], mc_question: bool = True) -> tuple[dict, int]:
    """One task's metrics on ``cfg.split`` (``rows``: its :func:`read_clip_rows`) and how many clips
    (retrieval) or questions it scored; its per-item table and plot go into ``tables`` / ``figures``."""
    qa = read_qa(data.qa) if task == "qa" else None
    mc = read_mc(data.mc, "mc" if cfg.mc else "data.mc") if task == "mc" else None
    examples = read_examples(ft.model, data, cfg.split, qa, ft.answers or None, mc=mc, mc_question=mc_question,
                             rows=rows)
    if not examples:
        where = data.frames if data.source == "frames" else f"the videos of {data.manifest}"
        raise ConfigError("split", f"split {cfg.split!r} has no {task} examples in {where}"
                          + (f" (questions from {data.qa})" if qa else "") + (f" (questions from {data.mc})" if mc else ""))
    say(f"evaluate {ft.model.arch} {task} on {cfg.split}: {len(examples)} examples")
    scorer = scorer_of(model, ft.model, cfg.batch_size)
    if task == "retrieval":
        similarity = scorer.similarity(examples)
        metrics, tables["retrieval"] = score_retrieval(similarity, examples, caption_key="text")
        figures["recall_at_k"] = recall_curve_figure(similarity, f"retrieval on {cfg.split} ({len(examples)} clips)")
        return metrics, len(examples)
    if task == "mc":
        metrics, tables["multiple_choice"] = evaluate_mc(scorer.option_scores(examples), examples)
        return metrics, metrics["mc_questions"]
    predicted = scorer.answers(examples, ft.answers)
    metrics, tables["qa"], per_type = evaluate_qa(predicted, examples, ft.answers)
    figures["qa_accuracy_per_type"] = bar_figure(per_type or {"all": metrics["qa_accuracy"]},
                                                 f"QA accuracy per question type on {cfg.split}", "accuracy")
    return metrics, len(examples)


# --- the VQ video tokenizer (E-ViLM) ---------------------------------------------------------

VQ_EXPERIMENT = "vidray-vq-tokenizer"


def vq_size_figures(model_cfg) -> dict[str, float]:
    """Parameter count and the GFLOPs of coding one clip."""
    vocab = len(text_tokenizer(model_cfg.tokenizer))
    net = VQTokenizer(VQ_FLAVOURS[model_cfg.flavour], model_cfg, vocab)
    frames = torch.zeros(1, model_cfg.num_frames, 3, model_cfg.image_size, model_cfg.image_size)
    return measure_size(net, lambda: net.codes(frames))


def run_train_vq(cfg, say=print, tags: dict | None = None) -> dict[str, Any]:
    """Train a VQ video tokenizer (Ray Train, checkpoints, MLflow run) on the frames feature set, or
    on the manifest's videos decoded on the fly (``data.source=videos``)."""
    if cfg.model.flavour not in VQ_FLAVOURS:
        raise ConfigError("model.flavour", f"unknown flavour {cfg.model.flavour!r}; choose one of {sorted(VQ_FLAVOURS)}")
    tags = {**source_tags(cfg.data), "vq.kind": cfg.model.kind, **(tags or {})}
    if cfg.train.val_every and not cfg.data.manifest:
        raise ConfigError("data.manifest", "is required with train.val_every > 0")
    figures = vq_size_figures(cfg.model)
    say(f"VQ tokenizer ({cfg.model.kind}, {cfg.model.flavour}): {figures['model.parameters']:,} parameters, "
        f"{cfg.model.codebook_size} codes x {cfg.model.code_dim}, {figures['model.gflops_per_clip']} GFLOPs per clip")
    name = run_name(cfg, "vq", cfg.model.kind)

    def dataset(split: str):
        return examples_dataset(cfg.model, cfg.data, split, say=say,
                                skipped_to=skipped_videos_uri(cfg.train.storage_path, name, split))

    report = run_training(cfg, job="train-vq", experiment=cfg.mlflow.experiment or VQ_EXPERIMENT, run_name=name,
                          build_system=VQTrainSystem, make_dataset=lambda: dataset(cfg.data.split),
                          make_val_dataset=lambda: dataset(cfg.data.val_split),
                          tags=tags, params=figures, say=say)
    say(f"tokenizer checkpoint: {report['checkpoint']}  (cache its codes: `vidray extract` with "
        f"extractor: vq, vq.checkpoint: {report['checkpoint']})")
    return report
