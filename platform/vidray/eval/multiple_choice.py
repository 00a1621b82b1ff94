"""Multiple-choice QA, for every model: scoring the picks (the questions are read by
:func:`vidray.data.adapters.read_mc_rows`).

A question's options are scored by the model (VLM: each option's text vector against the clip's
video vector; a frames model: its matching score of option and clip); the option scoring strictly
highest is picked (ties count against the model) and accuracy is reported next to chance.
"""

from __future__ import annotations

import numpy as np


def mc_correct(scores: np.ndarray, answer: int) -> bool:
    """Whether the right option scores strictly highest: ties count against the model, as in retrieval."""
    others = np.delete(scores, answer)
    return bool(others.size == 0 or scores[answer] > others.max())


def mc_summary(table: list[dict], option_counts: list[int]) -> dict[str, float]:
    """``mc_accuracy`` over the table's questions next to ``mc_chance`` (1 / options, averaged)."""
    accuracy = float(np.mean([r["correct"] for r in table])) if table else float("nan")
    chance = float(np.mean([1 / n for n in option_counts])) if option_counts else float("nan")
    return {"mc_accuracy": accuracy, "mc_chance": chance, "mc_questions": len(table)}


def option_difference(answer: str, picked: str) -> str:
    """The words that tell the picked option from the answer (``left → right``; empty when it is
    the answer): MC options that differ in one word read alike as whole sentences in a table."""
    said, chosen = answer.split(), picked.split()
    only_answer, only_picked = [w for w in said if w not in chosen], [w for w in chosen if w not in said]
    return f"{' '.join(only_answer)} → {' '.join(only_picked)}" if only_answer or only_picked else ""


def mc_row(video_id: str, question: str, options: list[str], scores: np.ndarray, right: int) -> dict:
    """One row of an MC table: the answer, the option with the top score and what differs."""
    picked = options[int(np.argmax(scores))]
    return {"video_id": video_id, "question": question, "answer": options[right], "picked": picked,
            "differs": option_difference(options[right], picked), "correct": mc_correct(scores, right)}
