"""LAVENDER: everything as MLM through one head; the [MASK]-slot plumbing against naive references."""

from __future__ import annotations

import torch

from vidray.frames.config import FramesModelConfig
from vidray.frames.lavender import LAVENDER_FLAVOURS, Lavender
from vidray.frames.lavender_tasks import Words, insert_mask_slot, matching_batch, pair_scores, true_score
from vidray.frames.system import size_figures

CLS, SEP, MASK, PAD = 101, 102, 103, 0


def tiny(frames: int = 3) -> Lavender:
    torch.manual_seed(0)
    return Lavender(LAVENDER_FLAVOURS["tiny"], vocab_size=30522, image_size=64, num_frames=frames,
                    max_text_tokens=16).eval()


def test_mlm_logits_for_every_text_slot_and_the_head_is_tied_to_the_word_embeddings():
    model = tiny()
    frames, ids = torch.randn(2, 3, 3, 64, 64), torch.randint(1000, 2000, (2, 7))
    logits = model(frames, ids, torch.ones(2, 7, dtype=torch.bool))
    assert logits.shape == (2, 7, 30522)
    assert model.mlm.predictions.decoder.weight is model.embeddings.word_embeddings.weight
    # 64 px, 16-px patches: 4 x 4 tokens per frame, plus the frame's mean token.
    assert model.video_tokens(frames).shape == (2, 3 * (1 + 16), 64)
    # The text sees the video: other frames, other logits.
    assert not torch.allclose(logits, model(torch.randn(2, 3, 3, 64, 64), ids, torch.ones(2, 7, dtype=torch.bool)))


def test_padding_after_the_text_changes_nothing():
    model = tiny()
    frames, ids = torch.randn(1, 3, 3, 64, 64), torch.randint(1000, 2000, (1, 5))
    with torch.no_grad():
        out = model(frames, ids, torch.ones(1, 5, dtype=torch.bool))
        padded = model(frames, torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                       torch.tensor([[True] * 5 + [False] * 3]))
    torch.testing.assert_close(padded[:, :5], out, rtol=1e-4, atol=1e-4)


def test_mask_slot_goes_before_the_final_sep_of_each_row():
    ids = torch.tensor([[CLS, 7, 8, SEP, PAD], [CLS, 9, 10, 11, SEP]])
    mask = ids != PAD
    out, out_mask, slots = insert_mask_slot(ids, mask, [55, 56], MASK, PAD)
    assert out.tolist() == [[CLS, 7, 8, 55, 56, MASK, SEP, PAD], [CLS, 9, 10, 11, 55, 56, MASK, SEP]]
    assert out_mask.tolist() == [[True] * 7 + [False], [True] * 8]
    assert slots.tolist() == [5, 6] and out[torch.arange(2), slots].tolist() == [MASK, MASK]


def test_matching_pairs_each_text_with_its_clip_then_with_negatives():
    words = Words("minilm")
    frames = torch.arange(4, dtype=torch.float).view(4, 1, 1, 1, 1).expand(4, 1, 3, 2, 2)
    ids = torch.tensor([[CLS, 10 + i, SEP] for i in range(4)])
    pf, pi, pm, slots, targets = matching_batch(frames, ids, torch.ones_like(ids, dtype=torch.bool), words, 3)
    assert len(pf) == 16 and targets.tolist() == [words.true] * 4 + [words.false] * 12
    for k in range(16):  # naive: the k-th pair holds text k % 4 and clip (k % 4 - k // 4) mod 4
        text, clip = k % 4, (k % 4 - k // 4) % 4
        assert pi[k, 1].item() == 10 + text and pf[k, 0, 0, 0, 0].item() == clip
    assert words.true != words.false and words.tokenizer.convert_ids_to_tokens([words.true]) == ["true"]


def test_retrieval_score_is_p_true_over_p_true_plus_false():
    words = Words("minilm")
    logits = torch.randn(5, 30522)
    probs = torch.softmax(logits, -1)
    expected = probs[:, words.true] / (probs[:, words.true] + probs[:, words.false])
    torch.testing.assert_close(true_score(logits, words.true, words.false), expected)


def test_pair_scores_equal_one_forward_per_pair():
    model, words = tiny(), Words("minilm")
    frames = torch.randn(3, 3, 3, 64, 64)
    ids = torch.tensor([[CLS, 1200, 1300, SEP], [CLS, 1400, SEP, PAD]])
    mask = ids != PAD
    scores = pair_scores(model, words, frames, ids, mask, batch_size=2)
    for t in range(2):
        slot_ids, slot_mask, slots = insert_mask_slot(ids[t:t + 1], mask[t:t + 1], [], words.mask, words.pad)
        for v in range(3):
            logits = model(frames[v:v + 1], slot_ids, slot_mask)[0, slots[0]]
            torch.testing.assert_close(scores[t, v], true_score(logits[None], words.true, words.false)[0],
                                       rtol=1e-4, atol=1e-5)


def test_answer_words_outside_the_vocabulary_are_marked():
    words = Words("minilm")
    assert words.answer_token("red") == words.tokenizer.convert_tokens_to_ids("red")
    assert words.answer_token("xylophonist") == -100  # several WordPieces: LAVENDER cannot answer it


def test_size_figures_of_lavender():
    tiny_figures = size_figures(FramesModelConfig(arch="lavender", flavour="tiny", image_size=64, num_frames=3,
                                                  max_text_tokens=16))
    assert tiny_figures["model.parameters"] > 30522 * 64 and tiny_figures["model.gflops_per_clip"] > 0
