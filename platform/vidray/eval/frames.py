"""The evaluation of the frames models (``vidray evaluate`` on their checkpoints:
:func:`run_frames_evaluate`), and how a fine-tuned one scores what the evaluators score, per recipe
(:data:`vidray.archs.FramesArch.recipe`): a text-by-clip similarity matrix (retrieval), one score
per (question + option, clip) pair (multiple choice), and an answer per question (open-ended QA).

    scorer = scorer_of(model, ft.model, batch_size=64)
    similarity = scorer.similarity(examples)              # [texts, clips]

The metrics of these scores are written once for every model (:mod:`vidray.eval`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from vidray.archs import frames_arch
from vidray.config import ConfigError, from_dict
from vidray.config.frames import FramesFinetuneConfig
from vidray.config.train import EvaluateConfig
from vidray.data.frames import collate, read_clip_rows, read_examples, read_mc, read_qa
from vidray.eval.multiple_choice import mc_row, mc_summary
from vidray.eval.report import bar_figure, log_evaluation, recall_curve_figure
from vidray.eval.retrieval import score_retrieval
from vidray.models.weights import text_tokenizer
from vidray.objectives import allinone, lavender
from vidray.objectives.lavender import Words, append_mask_slot, insert_mask_slot, pair_scores, true_score


class TowerScorer:
    """All-in-one's recipe (E-ViLM's too): retrieval and MC from the separate text and video passes
    (the dot product of their unit embeddings), QA as the best class of the answer classifier."""

    def __init__(self, model: torch.nn.Module, model_cfg, batch_size: int):
        self.model, self.batch_size, self.width = model, batch_size, model_cfg.max_text_tokens
        self.pad_id = text_tokenizer(model_cfg.tokenizer).pad_token_id

    def batches(self, examples: list[dict]):
        for i in range(0, len(examples), self.batch_size):
            yield collate(examples[i:i + self.batch_size], self.width, self.pad_id)

    @torch.no_grad()
    def similarity(self, examples: list[dict]) -> np.ndarray:
        texts, videos = [], []
        for batch in self.batches(examples):
            texts.append(self.model.net.encode_text(batch["text_ids"], batch["text_mask"]))
            videos.append(self.model.net.encode_video(batch["frames"]))
        return (torch.cat(texts) @ torch.cat(videos).T).numpy()

    @torch.no_grad()
    def option_scores(self, examples: list[dict]) -> np.ndarray:
        """Each MC example's score: its option's text against its clip, the retrieval score."""
        net = self.model.net
        scores = [(net.encode_text(b["text_ids"], b["text_mask"]) * net.encode_video(b["frames"])).sum(-1)
                  for b in self.batches(examples)]
        return torch.cat(scores).float().numpy() if scores else np.zeros(0, np.float32)

    @torch.no_grad()
    def answers(self, examples: list[dict], answers: list[str]) -> list[str]:
        predicted: list[str] = []
        for batch in self.batches(examples):
            best = self.model.logits(batch["frames"], batch["text_ids"], batch["text_mask"]).argmax(-1).tolist()
            predicted += [answers[i] for i in best]
        return predicted


class MatchingScorer(TowerScorer):
    """LAVENDER's recipe, every task through the MLM head: a (text, clip) pair scores
    p(true) / (p(true) + p(false)) at a [MASK] appended to the text, one joint pass per pair (MC's
    options likewise); QA reads the word at the [MASK] after "answer:" (any word of the vocabulary)."""

    def __init__(self, model: torch.nn.Module, model_cfg, batch_size: int):
        super().__init__(model, model_cfg, batch_size)
        self.words = Words(model_cfg.tokenizer)

    @torch.no_grad()
    def similarity(self, examples: list[dict]) -> np.ndarray:
        batch = collate(examples, self.width, self.pad_id)
        return pair_scores(self.model.net, self.words, batch["frames"], batch["text_ids"], batch["text_mask"],
                           self.batch_size, self.width).numpy()

    @torch.no_grad()
    def option_scores(self, examples: list[dict]) -> np.ndarray:
        scores = []
        for batch in self.batches(examples):
            ids, mask, positions, slots = append_mask_slot(batch["text_ids"], batch["text_mask"], self.width,
                                                           self.words.mask)
            logits = self.model.net(batch["frames"], ids, mask, slots=slots, positions=positions)
            scores.append(true_score(logits, self.words.true, self.words.false))
        return torch.cat(scores).float().numpy() if scores else np.zeros(0, np.float32)

    @torch.no_grad()
    def answers(self, examples: list[dict], answers: list[str]) -> list[str]:
        w, predicted = self.words, []
        for batch in self.batches(examples):
            ids, mask, slots = insert_mask_slot(batch["text_ids"], batch["text_mask"], w.answer_prefix, w.mask, w.pad)
            best = self.model.net(batch["frames"], ids, mask, slots=slots).argmax(-1).tolist()
            predicted += w.tokenizer.convert_ids_to_tokens(best)
        return predicted


# recipe -> its scorer
SCORERS: dict[str, type[TowerScorer]] = {"allinone": TowerScorer, "lavender": MatchingScorer}


def scorer_of(model: torch.nn.Module, model_cfg, batch_size: int) -> TowerScorer:
    """The scorer of ``model`` (a fine-tuned task module of ``model_cfg.arch``), in eval mode."""
    return SCORERS[frames_arch(model_cfg.arch).recipe](model.eval(), model_cfg, batch_size)


# recipe (vidray.archs.FramesArch.recipe) -> the untrained module a fine-tuning run trains, for a
# checkpoint's weights.
TASK_MODELS = {"allinone": allinone.task_model, "lavender": lavender.task_model}


def finetuned_model(cfg) -> torch.nn.Module:
    """The untrained module a fine-tuning run of ``cfg`` trains, for its checkpoint's weights."""
    return TASK_MODELS[frames_arch(cfg.model.arch).recipe](cfg)


# The synthetic corpus's question types; "direction" needs two frames (temporal modelling).
TEMPORAL_TYPES = ("direction",)


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
