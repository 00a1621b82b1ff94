"""Retrieval scoring, for every model: a text x clip similarity matrix (row i's clip is column i)
-> the metrics of :mod:`vidray.eval.metrics` and a per-text table (its rank, the clip ranked first).

How the matrix is made is the model's business: VLM and All-in-one / E-ViLM encode texts and clips
apart and take dot products; LAVENDER fuses every pair (:mod:`vidray.eval.frames`).
"""

from __future__ import annotations

import numpy as np

from vidray.eval.metrics import ranks_of_correct, retrieval_metrics


def score_retrieval(similarity: np.ndarray, clips: list[dict], caption_key: str = "caption") -> tuple[dict, list[dict]]:
    """(metrics, table) of ``similarity`` over ``clips`` (each with ``video_id``, ``clip_index`` and
    its caption under ``caption_key``)."""
    ranks, best = ranks_of_correct(similarity), similarity.argmax(1)
    table = [{"video_id": c["video_id"], "clip_index": c["clip_index"], "caption": c[caption_key],
              "t2v_rank": int(r), "top1_video_id": clips[b]["video_id"], "top1_clip_index": clips[b]["clip_index"]}
             for c, r, b in zip(clips, ranks, best)]
    return retrieval_metrics(similarity), table
