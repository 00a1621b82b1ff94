"""Retrieval metrics against a naive per-query loop, and the pessimistic tie rule."""

from __future__ import annotations

import numpy as np
import pytest

from vidray.eval.metrics import ranks_of_correct, retrieval_metrics


def naive_rank(row: np.ndarray, correct: int) -> int:
    better_or_equal = [j for j in range(len(row)) if j != correct and row[j] >= row[correct]]
    return 1 + len(better_or_equal)


def test_ranks_match_a_naive_loop():
    sim = np.random.default_rng(0).normal(size=(50, 50)).round(1)  # rounding makes ties
    expected = [naive_rank(sim[i], i) for i in range(50)]
    np.testing.assert_array_equal(ranks_of_correct(sim), expected)


def test_perfect_constant_and_reversed():
    perfect = retrieval_metrics(np.eye(20))
    assert perfect["t2v_R1"] == perfect["v2t_R1"] == 1.0 and perfect["t2v_MdR"] == 1.0
    constant = retrieval_metrics(np.zeros((20, 20)))  # all tied: pessimistic -> last place
    assert constant["t2v_R1"] == 0.0 and constant["t2v_MdR"] == 20.0
    assert constant["chance_R1"] == pytest.approx(0.05)
    # Chance next to every figure: a random ranking's R@k and median rank.
    assert constant["chance_R5"] == pytest.approx(0.25) and constant["chance_R10"] == pytest.approx(0.5)
    assert constant["chance_MdR"] == 10.5
    ranks = np.array([ranks_of_correct(np.random.default_rng(s).random((20, 20))) for s in range(400)])
    assert np.mean(ranks <= 5) == pytest.approx(constant["chance_R5"], abs=0.02)
    assert np.median(ranks) == pytest.approx(constant["chance_MdR"], abs=1)


def test_directions_differ_when_the_matrix_is_asymmetric():
    sim = np.array([[0.9, 0.1, 0.0], [0.95, 0.5, 0.0], [0.0, 0.0, 1.0]])
    metrics = retrieval_metrics(sim, ks=(1,))
    assert metrics["t2v_R1"] == pytest.approx(2 / 3)  # text 1 prefers video 0
    assert metrics["v2t_R1"] == pytest.approx(2 / 3)  # video 0 prefers text 1 (0.95 > 0.9)
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((2, 3)))


def test_an_mc_row_names_the_word_that_differs():
    """Synthetic MC options differ in one word: the table shows it, not only two long sentences."""
    from vidray.eval.multiple_choice import mc_row, option_difference

    options = ["a red circle moves left", "a red circle moves right", "a blue circle moves left"]
    wrong = mc_row("v1", "what moves where?", options, np.array([0.1, 0.9, 0.3]), right=0)
    assert wrong["picked"] == options[1] and wrong["differs"] == "left → right" and not wrong["correct"]
    right = mc_row("v1", "what moves where?", options, np.array([0.8, 0.1, 0.3]), right=0)
    assert right["differs"] == "" and right["correct"]
    assert option_difference(options[0], options[2]) == "red → blue"


def test_score_retrieval_tables_each_text_with_its_rank_and_the_clip_ranked_first():
    from vidray.eval.retrieval import score_retrieval

    clips = [{"video_id": v, "clip_index": i, "text": f"caption {v}{i}"} for v, i in (("a", 0), ("a", 1), ("b", 0))]
    similarity = np.array([[0.9, 0.1, 0.0],
                           [0.5, 0.5, 0.2],   # a tie with another clip counts against the text
                           [0.8, 0.1, 0.3]])
    metrics, table = score_retrieval(similarity, clips, caption_key="text")
    assert [row["t2v_rank"] for row in table] == [1, 2, 2]
    assert [(row["top1_video_id"], row["top1_clip_index"]) for row in table] == [("a", 0), ("a", 0), ("a", 0)]
    assert table[2]["caption"] == "caption b0"
    assert metrics["t2v_R1"] == pytest.approx(1 / 3) and metrics["t2v_MdR"] == 2
