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
from vidray.feature_store.store import digest, open_version
from vidray.frames.config import FramesFinetuneConfig, FramesPretrainConfig
from vidray.frames.data import (VQCodes, answer_vocabulary, collate, examples_dataset, read_examples,
                                read_qa, tokenizer_for)
from vidray.manifest import split_videos
from vidray.frames.system import (QAModel, RetrievalModel, build_finetune_system, build_net,
                                  build_pretrain_system, mvm_settings, size_figures)
from vidray.metrics import ranks_of_correct, retrieval_metrics
from vidray.train.config import EvaluateConfig
from vidray.train.job import run_training

PRETRAIN_EXPERIMENT, FINETUNE_EXPERIMENT, EVALUATE_EXPERIMENT = (
    "vidray-pretrain", "vidray-finetune", "vidray-evaluate")
# The synthetic corpus's question types; "direction" needs two frames (temporal modelling).
TEMPORAL_TYPES = ("direction",)


def _run_name(cfg, kind: str) -> str:
    return cfg.train.run_name or f"{cfg.model.arch}-{kind}-" + digest(dataclasses.asdict(cfg))[:10]


def _frames_tag(data) -> dict[str, str]:
    if not data.frames:
        raise ConfigError("data.frames", "is required: the URI of a committed frames feature-set version "
                          "(see `vidray features ls ROOT`)")
    return {"feature_set.frames": open_version(data.frames).uri}


def run_frames_pretrain(cfg: FramesPretrainConfig, say=print, tags: dict | None = None,
                        callbacks: tuple = ()) -> dict[str, Any]:
    if cfg.train.val_every and not cfg.data.manifest:
        raise ConfigError("data.manifest", "is required with train.val_every > 0: it names the videos "
                          "of data.val_split")
    tags = {**_frames_tag(cfg.data), "arch": cfg.model.arch, **(tags or {})}
    mvm = mvm_settings(cfg)
    if mvm:
        tags.update({"feature_set.vq": mvm["uri"], "mvm_tokenizer": cfg.objective.mvm_tokenizer})
    figures = size_figures(cfg.model)
    say(f"{cfg.model.arch} ({cfg.model.flavour}): {figures['model.parameters']:,} parameters, "
        f"{figures['model.gflops_per_clip']} GFLOPs per clip"
        + (f"; MVM on {mvm['kind']} VQ codes ({mvm['codebook_size']} codes)" if mvm else ""))
    codes = []  # the codes go to the object store once Ray is up, shared by both datasets

    def dataset(split: str):
        if mvm and not codes:
            codes.append(shared_vq_codes(mvm["uri"], cfg.data.frames, say))
        return examples_dataset(cfg.model, cfg.data, split, vq=codes[0] if codes else None)

    return run_training(cfg, job="pretrain", experiment=cfg.mlflow.experiment or PRETRAIN_EXPERIMENT,
                        run_name=_run_name(cfg, "pretrain"), build_system=build_pretrain_system,
                        make_dataset=lambda: dataset(cfg.data.split),
                        make_val_dataset=lambda: dataset(cfg.data.val_split),
                        tags=tags, params=figures, callbacks=callbacks, say=say)


def shared_vq_codes(vq_uri: str, frames_uri: str, say=print):
    """The vq set's codes in Ray's object store (one copy per node), after checking that they
    cover the frames set's clips: clips without codes would silently drop out of pre-training."""
    import ray

    from vidray.feature_store import store

    codes = VQCodes.read(vq_uri)
    parts = [store.read_parquet(u, ["video_id", "clip_index"]) for u in store.open_version(frames_uri).part_uris]
    clips = [(v, c) for p in parts for v, c in zip(p["video_id"].to_pylist(), p["clip_index"].to_pylist())]
    missing = [k for k in clips if codes.get(*k) is None]
    if missing:
        say(f"warning: {len(missing)} of {len(clips)} clips of {frames_uri} have no codes in {vq_uri} "
            f"(e.g. {missing[0][0]} clip {missing[0][1]}); they are left out of pre-training. Was the vq "
            "set extracted from this frames set and the same manifest?")
    return ray.put(codes)


def with_answers(cfg: FramesFinetuneConfig) -> FramesFinetuneConfig:
    """``cfg`` with ``answers`` filled from the training split's questions when empty (qa)."""
    if cfg.task != "qa" or cfg.answers:
        return cfg
    answers = answer_vocabulary(read_qa(cfg.data.qa), split_videos(cfg.data.manifest, cfg.data.split))
    if not answers:
        raise ConfigError("data.qa", f"{cfg.data.qa} has no question about a video of split {cfg.data.split!r}")
    return dataclasses.replace(cfg, answers=answers)


def run_frames_finetune(cfg: FramesFinetuneConfig, say=print, tags: dict | None = None) -> dict[str, Any]:
    cfg = with_answers(cfg)
    qa = read_qa(cfg.data.qa) if cfg.task == "qa" else None
    tags = {**_frames_tag(cfg.data), "arch": cfg.model.arch, "task": cfg.task,
            "init_from": str(cfg.init_from), **(tags or {})}
    figures = size_figures(cfg.model, len(cfg.answers))
    report = run_training(cfg, job="finetune", experiment=cfg.mlflow.experiment or FINETUNE_EXPERIMENT,
                          run_name=_run_name(cfg, cfg.task), build_system=build_finetune_system,
                          make_dataset=lambda: examples_dataset(cfg.model, cfg.data, cfg.data.split, qa,
                                                                cfg.answers),
                          tags=tags, params=figures, say=say)
    return {**report, "task": cfg.task}


# --- evaluation -----------------------------------------------------------------------------------

def load_frames_finetuned(state: dict) -> tuple[FramesFinetuneConfig, torch.nn.Module]:
    cfg = from_dict(FramesFinetuneConfig, state["config"])
    if cfg.model.arch == "lavender":
        from vidray.frames.lavender_tasks import LavenderQAModel, LavenderRetrievalModel

        net = build_net(cfg.model)
        model = LavenderQAModel(net) if cfg.task == "qa" else LavenderRetrievalModel(net)
    else:
        net = build_net(cfg.model, len(cfg.answers) if cfg.task == "qa" else 0)
        model = QAModel(net) if cfg.task == "qa" else RetrievalModel(net)
    model.load_state_dict(state["model"])
    return cfg, model.eval()


def _batches(examples: list[dict], size: int, max_text_tokens: int, pad_id: int):
    for i in range(0, len(examples), size):
        yield collate(examples[i:i + size], max_text_tokens, pad_id)


@torch.no_grad()
def similarity_matrix(model, arch: str, tokenizer: str, examples: list[dict], batch_size: int,
                      max_text_tokens: int, pad_id: int) -> np.ndarray:
    """Text-by-clip scores: All-in-one's separate passes and a dot product; LAVENDER's
    p(true) / (p(true) + p(false)) of a joint pass per pair."""
    if arch == "lavender":
        from vidray.frames.lavender_tasks import Words, pair_scores

        batch = collate(examples, max_text_tokens, pad_id)
        return pair_scores(model.net, Words(tokenizer), batch["frames"], batch["text_ids"], batch["text_mask"],
                           batch_size).numpy()
    texts, videos = [], []
    for batch in _batches(examples, batch_size, max_text_tokens, pad_id):
        texts.append(model.net.encode_text(batch["text_ids"], batch["text_mask"]))
        videos.append(model.net.encode_video(batch["frames"]))
    return (torch.cat(texts) @ torch.cat(videos).T).numpy()


def evaluate_retrieval(similarity: np.ndarray, examples: list[dict]) -> tuple[dict, list[dict], np.ndarray]:
    ranks, best = ranks_of_correct(similarity), similarity.argmax(1)
    table = [{"video_id": e["video_id"], "clip_index": e["clip_index"], "caption": e["text"],
              "t2v_rank": int(r), "top1_video_id": examples[b]["video_id"],
              "top1_clip_index": examples[b]["clip_index"]} for e, r, b in zip(examples, ranks, best)]
    return retrieval_metrics(similarity), table, similarity


def _majority(answers: list[str]) -> float:
    """Accuracy of the best constant answer on these questions (a baseline above 1 / answers)."""
    return max(answers.count(a) for a in set(answers)) / len(answers) if answers else float("nan")


@torch.no_grad()
def predicted_answers(model, arch: str, tokenizer: str, examples: list[dict], answers: list[str],
                      batch_size: int, max_text_tokens: int, pad_id: int) -> list[str]:
    """All-in-one: the best of its answer classes; LAVENDER: the word its MLM head puts at the
    [MASK] after "answer:" (any word of the vocabulary)."""
    words = None
    if arch == "lavender":
        from vidray.frames.lavender_tasks import Words, insert_mask_slot

        words = Words(tokenizer)
    predicted: list[str] = []
    for batch in _batches(examples, batch_size, max_text_tokens, pad_id):
        if words is None:
            best = model.logits(batch["frames"], batch["text_ids"], batch["text_mask"]).argmax(-1).tolist()
            predicted += [answers[i] for i in best]
        else:
            ids, mask, slots = insert_mask_slot(batch["text_ids"], batch["text_mask"], words.answer_prefix,
                                                words.mask, words.pad)
            best = model.net(batch["frames"], ids, mask, slots=slots).argmax(-1).tolist()
            predicted += words.tokenizer.convert_ids_to_tokens(best)
    return predicted


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


def run_frames_evaluate(cfg: EvaluateConfig, state: dict, say: Callable[[str], None] = print,
                        tags: dict | None = None) -> dict[str, Any]:
    """Evaluate a frames model's fine-tuning checkpoint (``state`` already loaded)."""
    from vidray.vlm.evaluate import _log, bar_figure, recall_curve_figure

    ft, model = load_frames_finetuned(state)
    data = dataclasses.replace(ft.data, frames=cfg.frames or ft.data.frames,
                               manifest=cfg.manifest or ft.data.manifest, qa=cfg.qa or ft.data.qa)
    qa = read_qa(data.qa) if ft.task == "qa" else None
    examples = read_examples(ft.model, data, cfg.split, qa, ft.answers or None)
    if not examples:
        raise ConfigError("split", f"split {cfg.split!r} has no {ft.task} examples in {data.frames}"
                          + (f" (questions from {data.qa})" if qa else ""))
    say(f"evaluate {ft.model.arch} {ft.task} on {cfg.split}: {len(examples)} examples")
    pad_id = tokenizer_for(ft.model.tokenizer).pad_token_id
    tables, figures = {}, {}
    arch, tokenizer = ft.model.arch, ft.model.tokenizer
    if ft.task == "retrieval":
        similarity = similarity_matrix(model, arch, tokenizer, examples, cfg.batch_size, ft.model.max_text_tokens,
                                       pad_id)
        metrics, tables["retrieval"], similarity = evaluate_retrieval(similarity, examples)
        figures["recall_at_k"] = recall_curve_figure(similarity, f"retrieval on {cfg.split} ({len(examples)} clips)")
    else:
        predicted = predicted_answers(model, arch, tokenizer, examples, ft.answers, cfg.batch_size,
                                      ft.model.max_text_tokens, pad_id)
        metrics, tables["qa"], per_type = evaluate_qa(predicted, examples, ft.answers)
        figures["qa_accuracy_per_type"] = bar_figure(per_type or {"all": metrics["qa_accuracy"]},
                                                     f"QA accuracy per question type on {cfg.split}", "accuracy")
    metrics["examples"] = len(examples)
    run_id = _log(cfg, ft, metrics, tables, figures, {}, {"arch": ft.model.arch, **(tags or {})})
    say(f"evaluate {ft.model.arch} {ft.task} on {cfg.split}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)) + f"; MLflow run {run_id}")
    return {"task": ft.task, "split": cfg.split, "metrics": metrics, "mlflow_run_id": run_id,
            "checkpoint": cfg.checkpoint}
