"""Fine-tuning heads (tiny VLM): retrieval's separate passes equal the joint isolated pass and its
loss equals a naive loop; captioning's teacher forcing, causality and loss; segmentation's
per-second loss with padding ignored; clip examples and sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vidray.config.vlm import ModelConfig
from vidray.data.vlm import clip_examples_of_video, collate, collate_windows, segment_windows, seconds_of_span
from vidray.models.vlm import CLS_ID, SEP_ID, build_vlm, pool
from vidray.objectives.contrastive import contrastive_loss
from vidray.objectives.vlm import IGNORE_INDEX
from vidray.objectives.vlm_tasks import CaptioningModel, RetrievalModel, SegmentationModel, shift_right

LV, LT, DIM = 4, 7, 8
CFG = ModelConfig(flavour="tiny", video_dim=DIM, max_video_tokens=LV, max_seq_len=LV + LT + 2)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return build_vlm(CFG).eval()


def batch_of(n: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    videos = [rng.normal(size=(int(rng.integers(1, LV + 1)), DIM)).astype(np.float32) for _ in range(n)]
    texts = [rng.integers(1000, 2000, size=int(rng.integers(1, LT))) for _ in range(n)]
    return collate({"video": videos, "text_ids": texts}, LV, LT - 1, SEP_ID)


def test_retrieval_separate_passes_equal_the_joint_isolated_pass(vlm):
    model, batch = RetrievalModel(vlm), batch_of()
    with torch.no_grad():
        hidden = vlm(batch["video"], batch["video_mask"], batch["text_ids"], batch["text_mask"], "isolated")
        joint_video, joint_text = pool(hidden, batch["video_mask"], batch["text_mask"])
        assert_close(model.encode_video(batch["video"], batch["video_mask"]), joint_video, atol=1e-5, rtol=1e-5)
        assert_close(model.encode_text(batch["text_ids"], batch["text_mask"]), joint_text, atol=1e-5, rtol=1e-5)
        # The video vector does not move when the text changes (and the other way round).
        other = batch_of(seed=1)
        assert_close(model.encode_text(batch["text_ids"], batch["text_mask"]),
                     pool(vlm(other["video"], other["video_mask"], batch["text_ids"], batch["text_mask"],
                              "isolated"), other["video_mask"], batch["text_mask"])[1], atol=1e-5, rtol=1e-5)


def mmpt_pooling(hidden: torch.Tensor, video_mask: torch.Tensor, text_mask: torch.Tensor):
    """A transcription of MMPT's ``MMFusion._pooling_vt_layer`` (fairseq examples/MMPT/mmpt/models/
    mmfusion.py), slot by slot: the video vector averages ``hidden[:, 1:Lv + 2]`` under
    ``cat([vmasks, ones])`` (the video slots AND the [SEP] after them); the text vector averages
    ``hidden[:, Lv + 2:]`` under ``cmasks[:, 2:]`` (the text and its final [SEP], no [PAD])."""
    lv = video_mask.shape[1]
    videos, texts = [], []
    for b in range(len(hidden)):
        video_slots = [1 + s for s in range(lv) if video_mask[b, s]] + [lv + 1]
        text_slots = [lv + 2 + t for t in range(text_mask.shape[1]) if text_mask[b, t]]
        videos.append(torch.stack([hidden[b, i] for i in video_slots]).mean(0))
        texts.append(torch.stack([hidden[b, i] for i in text_slots]).mean(0))
    return torch.stack(videos), torch.stack(texts)


def test_retrieval_pooling_equals_a_transcription_of_mmpt(vlm):
    model, batch = RetrievalModel(vlm), batch_of(4, seed=5)
    with torch.no_grad():
        hidden = vlm(batch["video"], batch["video_mask"], batch["text_ids"], batch["text_mask"], "isolated")
        video, text = mmpt_pooling(hidden, batch["video_mask"], batch["text_mask"])
        assert_close(model.encode_video(batch["video"], batch["video_mask"]), video, atol=1e-5, rtol=1e-5)
        assert_close(model.encode_text(batch["text_ids"], batch["text_mask"]), text, atol=1e-5, rtol=1e-5)
        loss, _ = model(**batch)
    assert_close(loss, contrastive_loss(text, video)[0], atol=1e-5, rtol=1e-5)


def test_contrastive_loss_matches_a_naive_loop():
    torch.manual_seed(1)
    text, video = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    naive = []
    for i in range(5):
        scores = torch.stack([text[i] @ video[j] for j in range(5)])
        naive.append(-(scores[i] - torch.logsumexp(scores, 0)))
    expected = torch.stack(naive).mean()
    assert_close(contrastive_loss(text, video)[0], expected)
    g1 = torch.autograd.grad(contrastive_loss(text, video)[0], (text, video))
    g2 = torch.autograd.grad(expected, (text, video))
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_retrieval_forward_is_the_contrastive_loss_of_the_pooled_sides(vlm):
    model, batch = RetrievalModel(vlm), batch_of(4)
    with torch.no_grad():
        loss, logs = model(**batch)
        video, text = model.encode_video(batch["video"], batch["video_mask"]), model.encode_text(
            batch["text_ids"], batch["text_mask"])
    assert_close(loss, contrastive_loss(text, video)[0], atol=1e-5, rtol=1e-5)
    hits = ((text @ video.T).argmax(1) == torch.arange(4)).float().mean().item()
    assert logs["t2v_batch_accuracy"] == pytest.approx(hits)


def test_shift_right_puts_bos_first_and_drops_the_final_sep_from_the_inputs():
    text_ids = torch.tensor([[5, 6, SEP_ID, 0], [7, 8, 9, SEP_ID]])
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    inputs, input_mask = shift_right(text_ids, mask)
    assert inputs.tolist() == [[CLS_ID, 5, 6, SEP_ID], [CLS_ID, 7, 8, 9]]
    assert input_mask.tolist() == mask.tolist()  # n + 1 valid slots on both sides


def test_captioning_loss_is_next_token_cross_entropy_and_causal(vlm):
    model, batch = CaptioningModel(vlm), batch_of(3, seed=2)
    with torch.no_grad():
        loss, _ = model(**batch)
        inputs, input_mask = shift_right(batch["text_ids"], batch["text_mask"])
        logits = model.text_logits(batch["video"], batch["video_mask"], inputs, input_mask)
    terms = [F.cross_entropy(logits[b, j][None], batch["text_ids"][b, j][None])
             for b in range(3) for j in range(batch["text_ids"].shape[1]) if batch["text_mask"][b, j]]
    assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)

    # Changing a later input token leaves the logits of earlier positions as they were.
    changed = inputs.clone()
    changed[:, 2] = 1500
    with torch.no_grad():
        after = model.text_logits(batch["video"], batch["video_mask"], changed, input_mask)
    assert_close(after[:, :2], logits[:, :2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[0, 2:3], logits[0, 2:3])


def test_next_token_log_probs_read_the_last_prefix_slot(vlm):
    model, batch = CaptioningModel(vlm), batch_of(2, seed=3)
    prefixes = torch.tensor([[CLS_ID, 1200, 1300], [CLS_ID, 1400, 1500]])
    log_probs = model.next_token_log_probs(batch["video"], batch["video_mask"], prefixes)
    with torch.no_grad():
        logits = model.text_logits(batch["video"], batch["video_mask"], prefixes, torch.ones_like(prefixes).bool())
    assert_close(log_probs, torch.log_softmax(logits[:, -1], -1))
    assert_close(log_probs.exp().sum(-1), torch.ones(2))


def test_segmentation_loss_ignores_unlabelled_and_padded_seconds(vlm):
    model = SegmentationModel(vlm, num_classes=3)
    windows = {"video": [np.ones((4, DIM), np.float32), np.ones((2, DIM), np.float32)],
               "labels": [np.array([0, 1, IGNORE_INDEX, 2]), np.array([1, 1])]}
    batch = collate_windows(windows, window=LV)
    assert batch["labels"].tolist() == [[0, 1, IGNORE_INDEX, 2], [1, 1, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["video_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    with torch.no_grad():
        loss, logs = model(**batch)
        logits = model.logits(batch["video"], batch["video_mask"])
    terms = [F.cross_entropy(logits[b, s][None], batch["labels"][b, s][None])
             for b in range(2) for s in range(LV) if batch["labels"][b, s] != IGNORE_INDEX]
    assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    labelled = [(b, s) for b in range(2) for s in range(LV) if batch["labels"][b, s] != IGNORE_INDEX]
    right = [bool(logits[b, s].argmax() == batch["labels"][b, s]) for b, s in labelled]
    assert logs["frame_accuracy"] == pytest.approx(sum(right) / len(labelled))  # over the 5 labelled seconds


def mmpt_coin_iso_mask(video_mask: torch.Tensor) -> torch.Tensor:
    """MMPT's COIN input and mask, transcribed: ``COINActionSegmentationAligner`` gives the text
    side ``caps = [CLS, SEP, PAD, SEP]``, ``cmasks = [0, 1, 0, 1]``, and ``coin.yaml`` sets
    ``num_iso_layer: 12`` so every layer uses ``MMFusion._make_iso_mask``: row [CLS] sees only
    itself; the video rows and the first [SEP] see the valid video slots and that [SEP]; the text
    rows see the text slots whose cmask is 1. Sequence: [CLS] v_1..v_Lv [SEP] [PAD] [SEP]."""
    B, lv = video_mask.shape
    cmasks = [False, True, False, True]
    length = lv + 4
    allowed = torch.zeros(B, length, length, dtype=torch.bool)
    for b in range(B):
        allowed[b, 0, 0] = True
        for q in range(1, lv + 2):
            for s in range(lv):
                allowed[b, q, 1 + s] = bool(video_mask[b, s])
            allowed[b, q, lv + 1] = cmasks[1]
        for q in range(lv + 2, length):
            for t in range(2):
                allowed[b, q, lv + 2 + t] = cmasks[2 + t]
    return allowed


def test_segmentation_logits_equal_mmpt_coin_isolated_pass(vlm):
    model = SegmentationModel(vlm, num_classes=3).eval()
    torch.manual_seed(4)
    video = torch.randn(2, LV, DIM)
    video_mask = torch.tensor([[True] * LV, [True, True, True, False]])
    caps_text = torch.tensor([[0, SEP_ID]] * 2)                 # MMPT's [PAD] [SEP] after the video [SEP]
    text_mask = torch.tensor([[False, True]] * 2)
    with torch.no_grad():
        hidden = vlm(video, video_mask, caps_text, text_mask, mmpt_coin_iso_mask(video_mask))
        expected = model.classifier(hidden[:, 1:LV + 1])
        logits = model.logits(video, video_mask)
    assert_close(logits[video_mask], expected[video_mask], atol=1e-5, rtol=1e-5)


def test_clip_examples_take_the_seconds_of_each_caption():
    features = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    captions = [{"start": 0.0, "end": 2.4, "text": "a", "input_ids": [1, 2]},
                {"start": 2.4, "end": 2.6, "text": "b", "input_ids": [3]},
                {"start": 9.5, "end": 11.0, "text": "c", "input_ids": [4, 5, 6]},
                {"start": None, "end": None, "text": "untimed", "input_ids": [7]}]
    examples = clip_examples_of_video("v", features, captions, max_video_tokens=2, max_text_tokens=2)
    assert [e["clip_index"] for e in examples] == [0, 1, 2]
    assert [len(e["video"]) for e in examples] == [2, 1, 1]   # 0..3 capped at 2; 2..3; 9..10
    assert examples[1]["video"].tolist() == features[2:3].tolist()
    assert examples[2]["text_ids"].tolist() == [4, 5]
    assert seconds_of_span(12.0, 13.0, 10) == (9, 10)         # past the end: the last second


def test_segment_windows_cover_every_second_and_end_at_the_end():
    features, labels = np.zeros((40, 2), np.float32), np.arange(40)
    windows = segment_windows("v", features, labels, window=16, stride=10)
    assert [w["first"] for w in windows] == [0, 10, 20, 24]
    assert all(len(w["video"]) == 16 and w["labels"].tolist() == list(range(w["first"], w["first"] + 16))
               for w in windows)
    short = segment_windows("v", features[:5], labels[:5], window=16, stride=10)
    assert [(w["first"], len(w["video"])) for w in short] == [(0, 5)]


def test_segmentation_evaluation_averages_overlapping_windows():
    """A stand-in model whose logits say "class = second index mod 2, confidence = window's first
    second + 1": where windows overlap the sum (= average for argmax) must decide per second."""
    from vidray.eval.vlm import evaluate_segmentation

    class Scripted:
        def logits(self, video, video_mask):
            seconds = video[..., 0]                          # the features carry their second index
            out = torch.zeros(*seconds.shape, 2)
            out[..., 0] = (seconds.long() % 2 == 0).float()
            out[..., 1] = (seconds.long() % 2 == 1).float()
            return out

    features = np.repeat(np.arange(6, dtype=np.float32)[:, None], DIM, axis=1)
    labels = np.array([0, 1, 0, 1, IGNORE_INDEX, 0])        # second 5 is labelled wrong on purpose
    windows = segment_windows("v", features, labels, window=4, stride=2)
    metrics, table, per_class = evaluate_segmentation(Scripted(), windows, {"even": 0, "odd": 1}, 2, 4)
    assert [r["second"] for r in table] == [0, 1, 2, 3, 5]   # the unlabelled second is left out
    assert [r["predicted"] for r in table] == ["even", "odd", "even", "odd", "odd"]
    assert metrics["frame_accuracy"] == pytest.approx(4 / 5) and metrics["seconds"] == 5
    assert per_class == {"even": pytest.approx(2 / 3), "odd": 1.0}
    assert metrics["majority_accuracy"] == pytest.approx(3 / 5) and metrics["chance_accuracy"] == 0.5
