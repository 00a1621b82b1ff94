"""`vidray evaluate`: a fine-tuned VLM checkpoint on a split, with the metrics of REFERENCE.md.

- retrieval: texts and videos encoded in separate passes, R@1/5/10 and MdR both ways (ties count
  against the model); with ``mc=FILE`` also multiple-choice QA accuracy, each option scored
  against its clip with the same encoders (VLM's MC-QA setup).
- captioning: greedy and beam-search captions, BLEU-3/4, METEOR, ROUGE-L, CIDEr
  (:mod:`vidray.eval.captioning`, pycocoevalcap's scorers).
- action_segmentation: sliding windows, logits averaged over overlapping windows, frame accuracy.

Each evaluation is an MLflow run (:mod:`vidray.eval.report`; experiment ``vidray-evaluate`` unless ``mlflow.experiment``)
with the metrics, chance levels, a per-item table (``eval/<split>/<task>.json``, MLflow's table
view) and a plot (recall@K curve, caption scores, per-class accuracy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from vidray.checkpoint import load_state
from vidray.config import ConfigError, from_dict
from vidray.config.train import EvaluateConfig, FinetuneConfig
from vidray.data.adapters import read_mc_rows
from vidray.data.manifest import split_videos
from vidray.data.vlm import (captions_by_video, collate, collate_windows, example_kwargs, task_examples,
                             text_budget, video_rows)
from vidray.eval.captioning import caption_metrics
from vidray.eval.multiple_choice import mc_row, mc_summary
from vidray.eval.report import bar_figure, log_evaluation, recall_curve_figure
from vidray.eval.retrieval import score_retrieval
from vidray.models.vlm import CLS_ID, SEP_ID, build_vlm
from vidray.models.weights import text_tokenizer
from vidray.objectives.masking import IGNORE_INDEX
from vidray.objectives.vlm_tasks import build_task_model

# --- loading -----------------------------------------------------------------------------------

def load_finetuned(checkpoint: str, state: dict | None = None) -> tuple[FinetuneConfig, torch.nn.Module]:
    """The fine-tuning config and its task model (eval mode, CPU) from a checkpoint folder."""
    state = state or load_state(checkpoint)
    try:
        cfg = from_dict(FinetuneConfig, state["config"])
    except ConfigError as err:
        raise ConfigError("checkpoint", f"{checkpoint} is not a fine-tuning checkpoint ({err}); "
                          "evaluate the output of `vidray finetune`") from None
    vlm = build_vlm(cfg.model, load_backbone=False)
    classes = state["model"]["classifier.bias"].shape[0] if cfg.task == "action_segmentation" else None
    model = build_task_model(cfg.task, vlm, classes)
    model.load_state_dict(state["model"])
    return cfg, model.eval()


def read_split(features_uri: str, manifest: str, split: str) -> pa.Table:
    """Feature rows (``video_id, features``) of the videos in ``split``."""
    from vidray.feature_store import store

    table = pa.concat_tables([store.read_parquet(u, ["video_id", "features"])
                              for u in store.open_version(features_uri).part_uris])
    keep = split_videos(manifest, split)
    if keep is not None:
        table = table.filter(pa.array([v in keep for v in table["video_id"].to_pylist()], pa.bool_()))
    if table.num_rows == 0:
        raise ConfigError("split", f"no video of split {split!r} in {features_uri}"
                          + (f" (manifest {manifest})" if manifest else ""))
    return table


def tokenizer_of(text_uri: str):
    """The tokenizer the text feature set was made with (for MC options and decoding)."""
    from vidray.feature_store.store import open_version

    return text_tokenizer(open_version(text_uri).manifest["config"]["tokenizer"], key="text")


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --- retrieval and multiple choice --------------------------------------------------------------

@torch.no_grad()
def encode_clips(model, clips: list[dict], batch_size: int, max_video_tokens: int,
                 max_text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, H]`` text vectors and ``[N, H]`` video vectors, each side in its own passes."""
    texts, videos = [], []
    for chunk in _chunks(clips, batch_size):
        batch = collate({"video": [c["video"] for c in chunk], "text_ids": [c["text_ids"] for c in chunk]},
                        max_video_tokens, max_text_tokens, SEP_ID)
        texts.append(model.encode_text(batch["text_ids"], batch["text_mask"]))
        videos.append(model.encode_video(batch["video"], batch["video_mask"]))
    return torch.cat(texts), torch.cat(videos)


def evaluate_retrieval(model, clips: list[dict], batch_size: int, max_video_tokens: int,
                       max_text_tokens: int) -> tuple[dict, list[dict], np.ndarray]:
    text_vec, video_vec = encode_clips(model, clips, batch_size, max_video_tokens, max_text_tokens)
    similarity = (text_vec @ video_vec.T).numpy()
    metrics, table = score_retrieval(similarity, clips)
    return metrics, table, similarity


def mc_questions(mc_uri: str, features: dict[str, np.ndarray], tokenizer,
                 max_video_tokens: int, max_text_tokens: int) -> list[dict]:
    """MC rows of the evaluated videos, with the clip's seconds and each option's ids."""
    from vidray.data.vlm import seconds_of_span

    out = []
    for row in read_mc_rows(mc_uri):
        if row["video"] not in features:
            continue
        seconds = features[row["video"]]
        first, last = seconds_of_span(row["start"], row["end"], len(seconds))
        ids = tokenizer(row["options"], add_special_tokens=False)["input_ids"]
        out.append({"video_id": row["video"], "question": row["question"], "options": row["options"],
                    "answer": int(row["answer"]), "video": seconds[first:last][:max_video_tokens],
                    "option_ids": [np.asarray(i[:max_text_tokens], np.int64) for i in ids]})
    return out


@torch.no_grad()
def evaluate_mc(model, questions: list[dict], max_video_tokens: int, max_text_tokens: int) -> tuple[dict, list[dict]]:
    """Accuracy of picking the option whose text vector is closest to the clip's video vector."""
    table = []
    for q in questions:
        n = len(q["options"])
        batch = collate({"video": [q["video"]] * n, "text_ids": q["option_ids"]}, max_video_tokens,
                        max_text_tokens, SEP_ID)
        video = model.encode_video(batch["video"][:1], batch["video_mask"][:1])
        scores = (model.encode_text(batch["text_ids"], batch["text_mask"]) @ video[0]).numpy()
        table.append(mc_row(q["video_id"], q["question"], q["options"], scores, q["answer"]))
    return mc_summary(table, [len(q["options"]) for q in questions]), table


# --- captioning -----------------------------------------------------------------------------------

@torch.no_grad()
def generate_captions(model, clips: list[dict], batch_size: int, max_video_tokens: int, max_tokens: int,
                      beam_size: int) -> list[list[int]]:
    """Token ids of a caption per clip (greedy when ``beam_size == 1``)."""
    from vidray.models.decoding import beam_search, greedy_decode

    out: list[list[int]] = []
    for chunk in _chunks(clips, batch_size):
        batch = collate({"video": [c["video"] for c in chunk], "text_ids": [c["text_ids"] for c in chunk]},
                        max_video_tokens, 1, SEP_ID)
        video, video_mask = batch["video"], batch["video_mask"]

        def step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return model.next_token_log_probs(video[rows], video_mask[rows], prefixes)

        if beam_size == 1:
            out.extend(greedy_decode(step, len(chunk), CLS_ID, SEP_ID, max_tokens))
        else:
            out.extend(beam_search(step, len(chunk), CLS_ID, SEP_ID, max_tokens, beam_size=beam_size))
    return out


def evaluate_captioning(model, clips: list[dict], tokenizer, cfg: EvaluateConfig,
                        max_video_tokens: int, max_text_tokens: int) -> tuple[dict, list[dict], dict]:

    max_tokens = min(cfg.max_caption_tokens, max_text_tokens)
    # Several clips may share a video: key by clip, reference = that clip's caption.
    keys = [f"{c['video_id']}#{c['clip_index']}" for c in clips]
    references = {k: [c["caption"]] for k, c in zip(keys, clips)}
    decoders = {"greedy": 1} | ({"beam": cfg.beam_size} if cfg.beam_size > 1 else {})
    metrics, skipped, generated = {}, {}, {}
    for name, width in decoders.items():
        ids = generate_captions(model, clips, cfg.batch_size, max_video_tokens, max_tokens, width)
        generated[name] = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        scores, missing = caption_metrics(dict(zip(keys, generated[name])), references)
        metrics.update({f"{name}_{k}": v for k, v in scores.items()})
        skipped.update(missing)
    table = [{"video_id": c["video_id"], "clip_index": c["clip_index"], "reference": c["caption"],
              **{name: captions[i] for name, captions in generated.items()}} for i, c in enumerate(clips)]
    return metrics, table, skipped


# --- action segmentation ------------------------------------------------------------------------

@torch.no_grad()
def evaluate_segmentation(model, windows: list[dict], classes: dict[str, int], batch_size: int,
                          window: int) -> tuple[dict, list[dict], dict]:
    """Frame accuracy over labelled seconds, logits averaged where windows overlap."""
    by_video: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for chunk in _chunks(windows, batch_size):
        batch = collate_windows({"video": [w["video"] for w in chunk], "labels": [w["labels"] for w in chunk]},
                                window)
        logits = model.logits(batch["video"], batch["video_mask"]).numpy()
        for w, lg in zip(chunk, logits):
            by_video.setdefault(w["video_id"], []).append((w["first"], lg[:len(w["video"])], w["labels"]))
    summed: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for video_id, parts in by_video.items():
        length = max(first + len(lg) for first, lg, _ in parts)
        summed[video_id] = np.zeros((length, parts[0][1].shape[-1]))
        labels[video_id] = np.full(length, IGNORE_INDEX)
        for first, lg, y in parts:  # summing equals averaging for the argmax
            summed[video_id][first:first + len(lg)] += lg
            labels[video_id][first:first + len(lg)] = y
    names = {i: name for name, i in classes.items()}
    table, per_class = [], {name: [] for name in classes}
    for video_id in sorted(summed):
        predicted = summed[video_id].argmax(-1)
        for second, (y, p) in enumerate(zip(labels[video_id], predicted)):
            if y == IGNORE_INDEX:
                continue
            table.append({"video_id": video_id, "second": second, "label": names[int(y)],
                          "predicted": names[int(p)]})
            per_class[names[int(y)]].append(int(y) == int(p))
    truth = [r["label"] for r in table]
    majority = max((truth.count(c) for c in classes), default=0) / max(len(truth), 1)
    metrics = {"frame_accuracy": float(np.mean([r["label"] == r["predicted"] for r in table])) if table else float("nan"),
               "chance_accuracy": 1.0 / len(classes), "majority_accuracy": majority, "seconds": len(table)}
    return metrics, table, {c: float(np.mean(v)) for c, v in per_class.items() if v}


# --- the job ------------------------------------------------------------------------------------

def run_vlm_evaluate(cfg: EvaluateConfig, state: dict, say: Callable[[str], None] = print,
                     tags: dict | None = None) -> dict[str, Any]:
    """Evaluate a VLM fine-tuning checkpoint (``state`` already loaded, see
    :func:`vidray.eval.evaluate.run_evaluate`); ``tags`` go on the MLflow run."""
    ft, model = load_finetuned(cfg.checkpoint, state)
    # The data it read, resolved: the params of the run name it (empty meant "the checkpoint's").
    cfg = dataclasses.replace(cfg, features=cfg.features or ft.data.features, text=cfg.text or ft.data.text,
                              manifest=cfg.manifest or ft.data.manifest)
    features_uri, manifest = cfg.features, cfg.manifest
    table = read_split(features_uri, manifest, cfg.split)
    lv, lt = ft.model.max_video_tokens, text_budget(ft.model)
    captions = None if ft.task == "action_segmentation" else captions_by_video(cfg.text or ft.data.text)
    kwargs = example_kwargs(ft, cfg.labels or None)
    examples = task_examples(ft.task, video_rows(table, captions), **kwargs)
    if not examples:
        raise ConfigError("split", f"split {cfg.split!r} has no {ft.task} examples (no timed captions / labels)")
    say(f"evaluate {ft.task} on {cfg.split}: {len(examples)} examples from {table.num_rows} videos")
    tables, figures, notes = {}, {}, {}
    if ft.task == "retrieval":
        metrics, tables["retrieval"], similarity = evaluate_retrieval(model, examples, cfg.batch_size, lv, lt)
        figures["recall_at_k"] = recall_curve_figure(similarity, f"retrieval on {cfg.split} ({len(examples)} clips)")
        if cfg.mc:
            features = {v: f for v, f, _ in video_rows(table)}
            questions = mc_questions(cfg.mc, features, tokenizer_of(cfg.text or ft.data.text), lv, lt)
            mc_metrics, tables["multiple_choice"] = evaluate_mc(model, questions, lv, lt)
            metrics.update(mc_metrics)
    elif ft.task == "captioning":
        metrics, tables["captions"], skipped = evaluate_captioning(
            model, examples, tokenizer_of(cfg.text or ft.data.text), cfg, lv, lt)
        notes["skipped_metrics"] = skipped
        figures["caption_metrics"] = bar_figure(metrics, f"captioning on {cfg.split}", "score")
    else:
        classes = kwargs["classes"]
        metrics, tables["segmentation"], per_class = evaluate_segmentation(model, examples, classes,
                                                                           cfg.batch_size, lv)
        figures["per_class_accuracy"] = bar_figure(per_class, f"frame accuracy per class on {cfg.split}",
                                                   "accuracy")
    metrics["examples"] = len(examples)
    run_id = log_evaluation(cfg, ft, metrics, tables, figures, notes, tags or {})
    say(f"evaluate {ft.task} on {cfg.split}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)) + f"; MLflow run {run_id}")
    return {"task": ft.task, "split": cfg.split, "metrics": metrics, "mlflow_run_id": run_id,
            "checkpoint": cfg.checkpoint, **({"notes": notes} if notes else {})}
