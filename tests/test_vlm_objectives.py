"""VLM masking and losses against naive references (REFERENCE.md, "VLM": Masking, Masked token loss)."""

from __future__ import annotations

import typing

import pytest
import torch
from torch.testing import assert_close

from vidray.config.vlm import ObjectiveConfig
from vidray.objectives.vlm import (IGNORE_INDEX, MMM_NONE, MMM_TEXT, MMM_VIDEO, OBJECTIVES, MaskedBatch,
                                   SpecialIds, apply_masking, draw_masking, gather_predictions, mask_batch,
                                   masked_token_loss, mfm_mlm_loss, video_candidates)

SPECIAL = SpecialIds()


def make_batch(B: int, Lv: int = 12, Lt: int = 20, D: int = 4, seed: int = 0, with_cls: bool = True) -> dict:
    """Random lengths; text = ([CLS]) ids.. [SEP] [PAD]..; video padded with zeros."""
    g = torch.Generator().manual_seed(seed)
    video_len = torch.randint(1, Lv + 1, (B,), generator=g)
    text_len = torch.randint(1, Lt, (B,), generator=g)  # real tokens (incl. the optional CLS)
    video_mask = torch.arange(Lv)[None] < video_len[:, None]
    video = torch.randn(B, Lv, D, generator=g) * video_mask[..., None]
    text_ids = torch.randint(1000, 30000, (B, Lt), generator=g)
    pos = torch.arange(Lt)[None]
    text_ids = torch.where(pos < text_len[:, None], text_ids, SPECIAL.pad)
    text_ids[torch.arange(B), text_len] = SPECIAL.sep
    if with_cls:
        text_ids[:, 0] = SPECIAL.cls
    text_mask = pos <= text_len[:, None]
    return {"video": video, "video_mask": video_mask, "text_ids": text_ids, "text_mask": text_mask}


def real_text(batch: dict) -> torch.Tensor:
    ids = batch["text_ids"]
    return batch["text_mask"] & (ids != SPECIAL.cls) & (ids != SPECIAL.sep) & (ids != SPECIAL.pad)


@pytest.fixture(scope="module")
def big():
    batch = make_batch(4000, Lv=32, Lt=40)
    cfg = ObjectiveConfig(mmm_ratio=0.5, mlm_prob=0.15, mfm_prob=0.15)
    return batch, mask_batch(batch, cfg, SPECIAL, torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------- masking


def test_mmm_share_and_split(big):
    _, m = big
    mmm = m.mmm
    assert set(mmm.unique().tolist()) <= {MMM_NONE, MMM_TEXT, MMM_VIDEO}
    share = (mmm != MMM_NONE).float().mean().item()
    assert abs(share - 0.5) < 0.03
    text_share = (mmm[mmm != MMM_NONE] == MMM_TEXT).float().mean().item()
    assert abs(text_share - 0.5) < 0.04


def test_mfm_mlm_statistics(big):
    batch, m = big
    mlm = (m.mmm == MMM_NONE)[:, None]
    real = real_text(batch) & mlm
    picked = m.text_targets != IGNORE_INDEX
    assert not (picked & ~real & mlm).any()
    assert abs(picked[real].float().mean().item() - 0.15) < 0.01
    original, corrupted = batch["text_ids"][picked & mlm], m.text_ids[picked & mlm]
    n = original.numel()
    to_mask = (corrupted == SPECIAL.mask).float().sum().item() / n
    kept = (corrupted == original).float().sum().item() / n
    randomised = ((corrupted != SPECIAL.mask) & (corrupted != original)).float().sum().item() / n
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02
    # Targets are the original ids; unpicked tokens are untouched.
    assert torch.equal(m.text_targets[picked], batch["text_ids"][picked])
    assert torch.equal(m.text_ids[~picked], batch["text_ids"][~picked])

    valid = batch["video_mask"] & mlm
    assert abs(m.video_targets[valid].float().mean().item() - 0.15) < 0.01
    assert not (m.video_targets & ~batch["video_mask"]).any()


def test_special_tokens_never_selected(big):
    batch, m = big
    ids = batch["text_ids"]
    special = (ids == SPECIAL.cls) | (ids == SPECIAL.sep) | (ids == SPECIAL.pad)
    assert special.sum() > 0 and (ids == SPECIAL.cls).sum() == len(ids)
    assert (m.text_targets[special] == IGNORE_INDEX).all()
    assert torch.equal(m.text_ids[special], ids[special])


def test_whole_modality_masks_are_whole(big):
    batch, m = big
    real, picked = real_text(batch), m.text_targets != IGNORE_INDEX
    text, video = m.mmm == MMM_TEXT, m.mmm == MMM_VIDEO
    # Whole text: every real token predicted, corrupted 80/10/10 (MMPT); the video is left intact.
    assert torch.equal(picked[text], real[text])
    original, corrupted = batch["text_ids"][text][real[text]], m.text_ids[text][real[text]]
    to_mask = (corrupted == SPECIAL.mask).float().mean().item()
    kept = (corrupted == original).float().mean().item()
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - to_mask - kept - 0.1) < 0.02
    assert not m.video_targets[text].any()
    assert torch.equal(m.video[text], batch["video"][text])
    # Whole video: every valid slot zeroed and predicted; the text is left intact.
    assert torch.equal(m.video_targets[video], batch["video_mask"][video])
    assert (m.video[video][batch["video_mask"][video]] == 0).all()
    assert not picked[video].any()
    assert torch.equal(m.text_ids[video], batch["text_ids"][video])


def test_video_zeroing_and_original(big):
    batch, m = big
    assert (m.video[m.video_targets] == 0).all()
    assert torch.equal(m.video[~m.video_targets], batch["video"][~m.video_targets])
    assert torch.equal(m.video_original, batch["video"])
    assert m.video_targets.dtype == torch.bool and m.text_targets.dtype == torch.long
    assert m.mmm.dtype == torch.long and m.mmm.shape == (4000,)


@pytest.mark.parametrize("ratio, expected", [(0.0, False), (1.0, True)])
def test_mmm_ratio_extremes(ratio, expected):
    batch = make_batch(500)
    m = mask_batch(batch, ObjectiveConfig(mmm_ratio=ratio), SPECIAL, torch.Generator().manual_seed(0))
    assert bool((m.mmm != MMM_NONE).all()) is expected and bool((m.mmm != MMM_NONE).any()) is expected


def test_deterministic_and_inputs_untouched():
    batch = make_batch(64)
    before = {k: v.clone() for k, v in batch.items()}
    cfg = ObjectiveConfig()
    a = mask_batch(batch, cfg, SPECIAL, torch.Generator().manual_seed(7))
    b = mask_batch(batch, cfg, SPECIAL, torch.Generator().manual_seed(7))
    c = mask_batch(batch, cfg, SPECIAL, torch.Generator().manual_seed(8))
    for field in ("video", "text_ids", "video_targets", "text_targets", "mmm"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.text_targets, c.text_targets)
    for key, value in before.items():
        assert torch.equal(batch[key], value), key
    assert a.video is not batch["video"] and a.text_ids is not batch["text_ids"]
    moved = a.to("cpu")
    assert isinstance(moved, MaskedBatch) and torch.equal(moved.text_targets, a.text_targets)


def test_whole_text_all_mask_option():
    """``mmm_text_corruption="mask"`` (vidray's rule before issue 18): every token of a whole
    masked text becomes [MASK]; MFM-MLM examples keep their 80/10/10."""
    batch = make_batch(400)
    cfg = ObjectiveConfig(mmm_ratio=1.0, mmm_text_corruption="mask")
    m = mask_batch(batch, cfg, SPECIAL, torch.Generator().manual_seed(3))
    text, real = m.mmm == MMM_TEXT, real_text(batch)
    assert text.sum() > 100
    assert (m.text_ids[text][real[text]] == SPECIAL.mask).all()
    assert torch.equal(m.text_targets[text][real[text]], batch["text_ids"][text][real[text]])


def small_vocab(batch: dict, special: SpecialIds) -> dict:
    """``batch`` with its words folded into ``special.vocab_size`` and its special ids renamed, so
    that random replacements hit special ids often."""
    ids = batch["text_ids"]
    words = ids % (special.vocab_size - 4) + 4
    for bert_id, small_id in ((SPECIAL.cls, special.cls), (SPECIAL.sep, special.sep), (SPECIAL.pad, special.pad)):
        words = torch.where(ids == bert_id, small_id, words)
    return {**batch, "text_ids": words}


def mmpt_masking(batch: dict, draws, mm_prob: float, mlm_prob: float, mfm_prob: float, special: SpecialIds):
    """A transcription of MMPT's masking, example by example and token by token, reading its coin
    flips from ``draws`` (fairseq examples/MMPT/mmpt/processors/how2processor.py):
    ``MFMMLMAligner.sampling`` picks the example's kind, ``TextMaskingProcessor.__call__`` masks the
    text ("full" = probability 1, "no" = 0, None = mlm_probability; [CLS]/[SEP]/[PAD] never; then
    bernoulli(0.8) -> [MASK], else bernoulli(0.5) -> torch.randint(len(tokenizer)), else kept;
    the "full" case included) and ``FrameMaskingProcessor`` zeroes video slots the same way."""
    text_ids, video = batch["text_ids"].clone(), batch["video"].clone()
    B, Lt = text_ids.shape
    Lv = video.shape[1]
    text_targets = torch.full_like(text_ids, IGNORE_INDEX)
    video_targets = torch.zeros(B, Lv, dtype=torch.bool)
    kinds = []
    for b in range(B):
        masking_text, masking_video = None, None
        if draws.u_example[b] < mm_prob:
            masking_text, masking_video = ("full", "no") if draws.u_side[b] < 0.5 else ("no", "full")
        kinds.append({None: MMM_NONE, "full": MMM_TEXT, "no": MMM_VIDEO}[masking_text])
        p_text = {None: mlm_prob, "full": 1.0, "no": 0.0}[masking_text]
        p_video = {None: mfm_prob, "full": 1.0, "no": 0.0}[masking_video]
        for t in range(Lt):
            token = int(batch["text_ids"][b, t])
            if not batch["text_mask"][b, t] or token in (special.cls, special.sep, special.pad):
                continue
            if draws.u_text[b, t] < p_text:                    # bernoulli(p)
                text_targets[b, t] = token
                u = float(draws.u_kind[b, t])
                if u < 0.8:                                       # bernoulli(0.8)
                    text_ids[b, t] = special.mask
                elif (u - 0.8) / 0.2 < 0.5:                       # bernoulli(0.5) of the rest
                    text_ids[b, t] = draws.random_ids[b, t]
        for s in range(Lv):
            if batch["video_mask"][b, s] and draws.u_video[b, s] < p_video:
                video_targets[b, s] = True
                video[b, s] = 0.0
    return text_ids, text_targets, video, video_targets, torch.tensor(kinds)


def test_masking_equals_a_transcription_of_mmpt():
    special = SpecialIds(pad=0, cls=1, sep=2, mask=3, vocab_size=12)
    batch = small_vocab(make_batch(48, Lv=5, Lt=9, D=2, seed=4), special)
    cfg = ObjectiveConfig()                                       # the default: MMPT's rule
    draws = draw_masking(48, 5, 9, special.vocab_size, torch.Generator().manual_seed(5),
                         torch.device("cpu"), torch.device("cpu"))
    ours = apply_masking(batch, cfg, special, draws)
    text_ids, text_targets, video, video_targets, kinds = mmpt_masking(
        batch, draws, cfg.mmm_ratio, cfg.mlm_prob, cfg.mfm_prob, special)
    assert torch.equal(ours.mmm, kinds)
    assert torch.equal(ours.text_ids, text_ids) and torch.equal(ours.text_targets, text_targets)
    assert torch.equal(ours.video, video) and torch.equal(ours.video_targets, video_targets)
    # Not vacuous: whole-text examples hold random and kept tokens, and some random ids are special.
    whole = (ours.mmm == MMM_TEXT)[:, None] & (ours.text_targets != IGNORE_INDEX)
    assert ((ours.text_ids != special.mask) & whole).sum() >= 5
    assert torch.isin(draws.random_ids, torch.tensor([0, 1, 2, 3])).any()
    # mask_batch is draw_masking + apply_masking on the same generator state.
    again = mask_batch(batch, cfg, special, torch.Generator().manual_seed(5))
    assert torch.equal(again.text_ids, ours.text_ids) and torch.equal(again.video, ours.video)


def test_missing_batch_key_is_named():
    batch = make_batch(2)
    del batch["text_mask"]
    with pytest.raises(KeyError, match="text_mask"):
        mask_batch(batch, ObjectiveConfig(), SPECIAL)


# ------------------------------------------------------------------------- naive references


def naive_masked_token_loss(pred_video, pos_video, cand_video, pred_text, text_targets, word_emb, lm_bias):
    losses = []
    bias = lm_bias if lm_bias is not None else torch.zeros(word_emb.shape[0], dtype=word_emb.dtype)
    for i in range(pred_video.shape[0]):
        h = pred_video[i]
        logits = torch.cat([(h * pos_video[i]).sum()[None], cand_video @ h, word_emb @ h + bias])
        losses.append(-torch.log_softmax(logits, 0)[0])
    for j in range(pred_text.shape[0]):
        h = pred_text[j]
        logits = torch.cat([cand_video @ h, word_emb @ h + bias])
        losses.append(-torch.log_softmax(logits, 0)[cand_video.shape[0] + int(text_targets[j])])
    return torch.stack(losses).mean()


def naive_mfm_mlm_loss(pred_video, pos_video, cand_video, text_logits, text_targets):
    video = [-torch.log_softmax(torch.cat([(h * p).sum()[None], cand_video @ h]), 0)[0]
             for h, p in zip(pred_video, pos_video)]
    text = [-torch.log_softmax(text_logits[j], 0)[int(text_targets[j])] for j in range(len(text_targets))]
    return torch.stack(video).mean() + torch.stack(text).mean()


def random_inputs(Nv=5, Nc=7, Nt=6, H=8, V=50, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    return dict(pred_video=t(Nv, H), pos_video=t(Nv, H), cand_video=t(Nc, H), pred_text=t(Nt, H),
                text_targets=torch.randint(0, V, (Nt,), generator=g), word_emb=t(V, H),
                lm_bias=t(V) if bias else None)


def check_against(loss_fn, naive_fn, inputs):
    loss, logs = loss_fn(**inputs)
    expected = naive_fn(**inputs)
    assert_close(loss, expected)
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, allow_unused=True)
    for g, w, leaf in zip(got, want, leaves):
        assert_close(g if g is not None else torch.zeros_like(leaf), w if w is not None else torch.zeros_like(leaf))
    return loss, logs


# ------------------------------------------------------------------------ masked token loss


@pytest.mark.parametrize("bias", [True, False])
def test_masked_token_loss_matches_naive(bias):
    inputs = random_inputs(bias=bias)
    loss, logs = check_against(masked_token_loss, naive_masked_token_loss, inputs)
    assert logs["n_video"] == 5 and logs["n_text"] == 6
    assert abs(logs["loss"] - loss.item()) < 1e-5
    assert abs((5 * logs["loss_video"] + 6 * logs["loss_text"]) / 11 - loss.item()) < 1e-5
    assert 0.0 <= logs["acc_video"] <= 1.0 and 0.0 <= logs["acc_text"] <= 1.0


@pytest.mark.parametrize("Nv, Nt, Nc", [(0, 6, 7), (5, 0, 7), (5, 6, 0)])
def test_masked_token_loss_empty_parts(Nv, Nt, Nc):
    check_against(masked_token_loss, naive_masked_token_loss, random_inputs(Nv=Nv, Nt=Nt, Nc=Nc))


def test_masked_token_loss_nothing_to_predict():
    inputs = random_inputs(Nv=0, Nt=0)
    loss, logs = masked_token_loss(**inputs)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert (inputs["word_emb"].grad == 0).all()
    assert logs["n_video"] == 0 and logs["n_text"] == 0


def test_masked_token_loss_near_zero_when_right_answer_dominates():
    Nv, Nc, V = 3, 4, 20
    H = Nv + Nc + V
    basis = torch.eye(H)
    cand, word_emb, pos = basis[:Nc], basis[Nc:Nc + V], basis[Nc + V:]
    ids = torch.tensor([0, 3, 7, 19, 11])
    loss, logs = masked_token_loss(50 * pos, pos, cand, 50 * word_emb[ids], ids, word_emb, torch.zeros(V))
    assert loss.item() < 1e-12
    assert logs["acc_video"] == 1.0 and logs["acc_text"] == 1.0


def test_masked_token_loss_invariant_to_candidate_order():
    inputs = random_inputs(seed=3)
    loss, _ = masked_token_loss(**inputs)
    g = torch.Generator().manual_seed(0)
    cand_perm = torch.randperm(inputs["cand_video"].shape[0], generator=g)
    vocab_perm = torch.randperm(inputs["word_emb"].shape[0], generator=g)
    new_id = torch.argsort(vocab_perm)  # word i now sits at row new_id[i]
    permuted = dict(inputs, cand_video=inputs["cand_video"][cand_perm], word_emb=inputs["word_emb"][vocab_perm],
                    lm_bias=inputs["lm_bias"][vocab_perm], text_targets=new_id[inputs["text_targets"]])
    assert_close(masked_token_loss(**permuted)[0], loss)


# ---------------------------------------------------------------------------- MFM-MLM loss


def mfm_inputs(Nv=5, Nc=7, Nt=6, H=8, V=50, seed=0):
    base = random_inputs(Nv=Nv, Nc=Nc, Nt=Nt, H=H, V=V, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    return dict(pred_video=base["pred_video"], pos_video=base["pos_video"], cand_video=base["cand_video"],
                text_logits=torch.randn(Nt, V, generator=g, dtype=torch.float64).requires_grad_(),
                text_targets=base["text_targets"])


def test_mfm_mlm_loss_matches_naive():
    loss, logs = check_against(mfm_mlm_loss, naive_mfm_mlm_loss, mfm_inputs())
    assert abs(logs["loss_video"] + logs["loss_text"] - loss.item()) < 1e-5
    assert logs["n_video"] == 5 and logs["n_text"] == 6


def test_mfm_mlm_loss_full_map_with_ignore_index_equals_gathered():
    inputs = mfm_inputs(Nt=6)
    B, Lt, V = 2, 5, inputs["text_logits"].shape[1]
    where = torch.zeros(B, Lt, dtype=torch.bool)
    where.view(-1)[torch.tensor([0, 2, 3, 5, 8, 9])] = True
    full_logits = torch.zeros(B, Lt, V, dtype=torch.float64).masked_scatter(where[..., None], inputs["text_logits"])
    full_targets = torch.full((B, Lt), IGNORE_INDEX).masked_scatter(where, inputs["text_targets"])
    full, _ = mfm_mlm_loss(**dict(inputs, text_logits=full_logits, text_targets=full_targets))
    assert_close(full, mfm_mlm_loss(**inputs)[0])


def test_mfm_mlm_loss_empty_parts():
    inputs = mfm_inputs(Nv=0)
    loss, logs = mfm_mlm_loss(**inputs)
    expected = torch.stack([-torch.log_softmax(inputs["text_logits"][j], 0)[int(t)]
                            for j, t in enumerate(inputs["text_targets"])]).mean()
    assert_close(loss, expected)
    assert logs["loss_video"] == 0.0
    empty, _ = mfm_mlm_loss(**mfm_inputs(Nv=0, Nt=0))
    assert empty.item() == 0.0 and empty.grad_fn is not None


# ------------------------------------------------------------------------------- gathering


def hand_made() -> MaskedBatch:
    video_mask = torch.tensor([[True, True, False], [True, True, True]])
    video_targets = torch.tensor([[False, True, False], [True, False, True]])
    text_targets = torch.tensor([[IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX], [5, IGNORE_INDEX, 9, IGNORE_INDEX]])
    text_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return MaskedBatch(video=torch.zeros(2, 3, 1), text_ids=torch.zeros(2, 4, dtype=torch.long),
                       video_targets=video_targets, text_targets=text_targets,
                       video_original=torch.zeros(2, 3, 1), mmm=torch.zeros(2, dtype=torch.long),
                       video_mask=video_mask, text_mask=text_mask)


def test_gather_predictions_exact_indices():
    m, Lv = hand_made(), 3
    # hidden[b, s] = 100 b + s: the value says which (example, sequence index) was gathered.
    hidden = (100 * torch.arange(2)[:, None] + torch.arange(Lv + 2 + 4)[None]).float()[..., None]
    video_h, text_h, ids = gather_predictions(hidden, m, Lv)
    # Video slot l sits at sequence index 1 + l; text slot t at Lv + 2 + t.
    assert video_h.squeeze(-1).tolist() == [2.0, 101.0, 103.0]
    assert text_h.squeeze(-1).tolist() == [6.0, 105.0, 107.0]
    assert ids.tolist() == [7, 5, 9]
    with pytest.raises(ValueError, match="hidden"):
        gather_predictions(hidden[:, :-1], m, Lv)


def test_video_candidates_exact_indices():
    m = hand_made()
    video_emb = (10 * torch.arange(2)[:, None] + torch.arange(3)[None]).float()[..., None]
    pos, cand = video_candidates(video_emb, m)
    assert pos.squeeze(-1).tolist() == [1.0, 10.0, 12.0]
    assert cand.squeeze(-1).tolist() == [0.0, 11.0]  # slot (0, 2) is padding, never a candidate


def test_end_to_end_both_objectives():
    """mask -> fake encoder -> gather -> both losses backpropagate into the video MLP and embeddings."""
    torch.manual_seed(0)
    Lv, Lt, D, H, V = 6, 8, 4, 16, 40
    special = SpecialIds(pad=0, cls=1, sep=2, mask=3, vocab_size=V)
    batch = make_batch(8, Lv=Lv, Lt=Lt, D=D, with_cls=False)
    batch["text_ids"] = torch.where(batch["text_ids"] >= 1000, batch["text_ids"] % (V - 4) + 4,
                                    torch.where(batch["text_ids"] == SPECIAL.sep, special.sep, special.pad))
    masked = mask_batch(batch, ObjectiveConfig(), special, torch.Generator().manual_seed(0))
    video_mlp, word_emb = torch.nn.Linear(D, H), torch.nn.Embedding(V, H)
    tokens = torch.cat([torch.zeros(8, 1, H), video_mlp(masked.video), torch.zeros(8, 1, H),
                        word_emb(masked.text_ids)], dim=1)
    hidden = torch.tanh(tokens)
    video_h, text_h, ids = gather_predictions(hidden, masked, Lv)
    pos, cand = video_candidates(video_mlp(masked.video_original), masked)
    assert video_h.shape[0] == pos.shape[0] == int(masked.video_targets.sum())
    assert cand.shape[0] == int((masked.video_mask & ~masked.video_targets).sum())
    for name, loss_fn in OBJECTIVES.items():
        if name == "masked_token":
            loss, logs = loss_fn(video_h, pos, cand, text_h, ids, word_emb.weight)
        else:
            loss, logs = loss_fn(video_h, pos, cand, text_h @ word_emb.weight.t(), ids)
        grads = torch.autograd.grad(loss, [video_mlp.weight, word_emb.weight], retain_graph=True)
        assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads), name
        assert set(logs) >= {"loss_video", "loss_text", "acc_video", "acc_text", "n_video", "n_text"}
        # acc_video's chance beside it: a guess among the positive and the batch's other video tokens
        assert logs["chance_acc_video"] == pytest.approx(1 / (1 + cand.shape[0]))


def test_registry_covers_config_names():
    names = typing.get_args(typing.get_type_hints(ObjectiveConfig)["name"])
    assert set(OBJECTIVES) == set(names)
