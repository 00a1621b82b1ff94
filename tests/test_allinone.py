"""All-in-one: temporal token rolling against a naive reference, the model's passes and sizes."""

from __future__ import annotations

import pytest
import torch

from vidray.config import ConfigError, load_config
from vidray.config.frames import FramesModelConfig, FramesPretrainConfig
from vidray.models import allinone
from vidray.models.allinone import ALLINONE_FLAVOURS, AllInOne, AllInOneHeads, temporal_roll
from vidray.models.build import size_figures
from vidray.objectives.masking import mask_text


def official_roll(visual: torch.Tensor) -> torch.Tensor:
    """The official TemporalRoll, v=0 (showlab/all-in-one, AllInOne/modules/temporal_roll.py),
    transcribed on ``[B, T, L, H]`` with L = 1 + P, the whole visual part: fold = L // 8, a zero
    tensor filled slice by slice: CLS kept, tokens 1..fold rolled +1 in time, the last fold
    rolled -1, the rest kept."""
    fold = visual.shape[2] // 8
    out = torch.zeros_like(visual)
    out[:, :, 0] = visual[:, :, 0]
    out[:, :, 1:fold + 1] = torch.roll(visual[:, :, 1:fold + 1], 1, 1)
    out[:, :, -fold:] = torch.roll(visual[:, :, -fold:], -1, 1)
    out[:, :, 1 + fold:-fold] = visual[:, :, 1 + fold:-fold]
    return out


def naive_roll(visual: torch.Tensor, fold: int) -> torch.Tensor:
    """The rule one token at a time: tokens 1..fold of frame t come from frame t-1, the last fold
    tokens from frame t+1 (cyclic); CLS and the rest stay."""
    b, t, l, h = visual.shape
    out = visual.clone()
    for frame in range(t):
        for token in range(l):
            if 1 <= token <= fold:
                out[:, frame, token] = visual[:, (frame - 1) % t, token]
            elif fold and token >= l - fold:
                out[:, frame, token] = visual[:, (frame + 1) % t, token]
    return out


# Square grids (16, 49, 196 patches), then grids where (1 + P) // 8 > P // 8: 7 = 1 x 7,
# 15 = 3 x 5, 23 patches (the old P // 8 rule gave 0, 1, 2 there).
@pytest.mark.parametrize("frames,patches", [(3, 16), (4, 49), (8, 196), (2, 9), (3, 7), (3, 15), (4, 23)])
def test_temporal_roll_is_exactly_the_official_permutation(frames, patches):
    visual = torch.randn(2, frames, 1 + patches, 5)
    rolled = temporal_roll(visual)
    torch.testing.assert_close(rolled, official_roll(visual), rtol=0, atol=0)
    fold = (1 + patches) // 8
    torch.testing.assert_close(rolled, naive_roll(visual, fold), rtol=0, atol=0)
    if patches % 8 == 7:  # where the official fold counts the CLS in, one more token rolls each way
        assert not torch.equal(rolled, naive_roll(visual, patches // 8))
    # A permutation: the same values, moved; applying its inverse (roll back) restores the input.
    assert torch.equal(rolled.flatten().sort().values, visual.flatten().sort().values)
    assert not torch.equal(rolled, visual)
    back = rolled.clone()
    back[:, :, 1:fold + 1] = rolled[:, :, 1:fold + 1].roll(-1, dims=1)
    back[:, :, -fold:] = rolled[:, :, -fold:].roll(1, dims=1)
    assert torch.equal(back, visual)


def test_under_seven_patches_nothing_rolls_where_the_official_slicing_rolls_everything():
    """fold = 0: the official ``x[:, :, -0:]`` is the whole frame, so every token, CLS included,
    rolls -1 in time, against the rule's "CLS kept"; ours leaves the frames as they are
    (docs/fidelity.md). Only frames of fewer than 7 patches reach it (not ViT-B at 224 px)."""
    visual = torch.randn(2, 3, 1 + 6, 5)
    assert torch.equal(temporal_roll(visual), visual)
    assert torch.equal(official_roll(visual), visual.roll(-1, dims=1))


def tiny_model(frames: int = 3, size: int = 64) -> AllInOne:
    torch.manual_seed(0)
    return AllInOne(ALLINONE_FLAVOURS["tiny"], vocab_size=100, image_size=size, num_frames=frames,
                    max_text_tokens=12)


def test_rolling_runs_before_every_block_of_joint_passes_only(monkeypatch):
    """A spy on the module's ``temporal_roll`` (not a fault mock): counted, then delegated."""
    calls = []
    monkeypatch.setattr(allinone, "temporal_roll", lambda v: calls.append(v.shape) or temporal_roll(v))
    model = tiny_model().eval()
    frames, ids = torch.randn(2, 3, 3, 64, 64), torch.randint(5, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    joint = model(frames, ids, mask)
    assert joint.shape == (2, 7 + 17, 64) and len(calls) == model.dims.layers
    assert all(shape == (2, 3, 17, 64) for shape in calls)  # visual tokens only: text is not rolled
    calls.clear()
    assert model(None, ids, mask).shape == (2, 7, 64) and model(frames, None).shape == (2, 17, 64)
    assert calls == []
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model().parameters())


def test_without_rolling_frames_meet_only_in_the_mean():
    """``temporal_roll=False`` (the paper's ablation): with the temporal embeddings zeroed, a joint
    pass no longer sees the order of frames; with rolling it does."""
    frames, ids = torch.randn(1, 3, 3, 64, 64), torch.randint(5, 100, (1, 7))
    mask = torch.ones(1, 7, dtype=torch.bool)
    outputs = {}
    for rolling in (True, False):
        torch.manual_seed(0)
        model = AllInOne(ALLINONE_FLAVOURS["tiny"], vocab_size=100, image_size=64, num_frames=3,
                         max_text_tokens=16, temporal_roll=rolling).eval()
        with torch.no_grad():
            model.temporal_pos.zero_()
            outputs[rolling] = (model(frames, ids, mask), model(frames.flip(1), ids, mask))
    torch.testing.assert_close(*outputs[False], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(*outputs[True], atol=1e-4)
    with pytest.raises(ConfigError, match="model.temporal_roll"):
        load_config(FramesPretrainConfig, None, ["model.arch=lavender", "model.temporal_roll=false"])


def test_joint_pass_depends_on_frame_order_and_ignores_padded_text():
    model = tiny_model().eval()
    frames, ids = torch.randn(1, 3, 3, 64, 64), torch.randint(5, 100, (1, 7))
    mask = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        out = model(frames, ids, mask)
        # Temporal embeddings and rolling make the order of frames matter.
        assert not torch.allclose(out, model(frames.flip(1), ids, mask), atol=1e-5)
        # Padding after the text changes nothing for the real slots.
        padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
        padded = model(frames, padded_ids, padded_mask)
        torch.testing.assert_close(padded[:, :7], out[:, :7], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded[:, 10:], out[:, 7:], rtol=1e-4, atol=1e-5)


def test_fast_retrieval_vectors_are_unit_and_separate():
    heads = AllInOneHeads(tiny_model(), embed_dim=16).eval()
    with torch.no_grad():
        text = heads.encode_text(torch.randint(5, 100, (3, 6)), torch.ones(3, 6, dtype=torch.bool))
        video = heads.encode_video(torch.randn(3, 3, 3, 64, 64))
    assert text.shape == video.shape == (3, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(video.norm(dim=-1), torch.ones(3))


def test_mlm_masking_follows_bert_rates_and_spares_special_tokens():
    ids = torch.randint(1000, 2000, (400, 40))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids, dtype=torch.bool)
    inputs, targets = mask_text(ids, mask, 0.15, 103, 30522, torch.Generator().manual_seed(0), (0, 101, 102, 103))
    chosen = targets != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert abs(chosen.float().mean().item() * 40 / 38 - 0.15) < 0.01
    masked = (inputs == 103) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.03
    kept = (inputs == ids) & chosen
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.03
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])


def test_size_figures_count_parameters_and_scale_flops_with_frames():
    three = size_figures(FramesModelConfig(flavour="tiny", image_size=64, num_frames=3, max_text_tokens=16))
    six = size_figures(FramesModelConfig(flavour="tiny", image_size=64, num_frames=6, max_text_tokens=16))
    assert three["model.parameters"] > 30522 * 64  # the word embeddings alone
    assert 1.8 < six["model.gflops_per_clip"] / three["model.gflops_per_clip"] < 2.2
    base = size_figures(FramesModelConfig(flavour="base", image_size=224, num_frames=3, max_text_tokens=40))
    # ViT-B/16 + BERT embeddings: ~110M parameters; ~3 x 17.6 GFLOPs (multiply-adds x 2) per clip.
    assert 100e6 < base["model.parameters"] < 125e6
    assert 90 < base["model.gflops_per_clip"] < 130


def test_contrastive_loss_spans_every_workers_batch():
    """Two real gloo processes: each worker's loss equals, computed naively in one process, the
    loss of its own rows against the whole batch of both workers."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    text, video = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1), torch.nn.functional.normalize(
        torch.randn(2, 3, 8), dim=-1)
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker_loss, args=(text, video, results), nprocs=2, join=True)
    all_text, all_video = text.flatten(0, 1), video.flatten(0, 1)
    for rank in range(2):
        rows = slice(3 * rank, 3 * rank + 3)
        target = torch.arange(3) + 3 * rank
        t2v, v2t = all_text[rows] @ all_video.T / 0.05, all_video[rows] @ all_text.T / 0.05
        expected = (torch.nn.functional.cross_entropy(t2v, target) + torch.nn.functional.cross_entropy(v2t, target)) / 2
        assert results[rank] == pytest.approx(expected.item(), rel=1e-5)


def _worker_loss(rank, text, video, results):
    import os

    import torch.distributed as dist

    from vidray.objectives.contrastive import contrastive_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = contrastive_loss(text[rank], video[rank], temperature=0.05, both_ways=True,
                                         across_workers=True)[0].item()
    finally:
        dist.destroy_process_group()
