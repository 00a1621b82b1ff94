"""E-ViLM's distinctive mechanisms against naive references: block-wise MVM masking, masked-region
zeroing, the MVM loss on masked regions only, and the VQ tokenizer (nearest code, straight-through
gradients, the codebook/commitment terms, the focal word loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vidray.config import ConfigError
from vidray.config.frames import (FramesDataConfig, FramesModelConfig, FramesObjectiveConfig,
                                  FramesPretrainConfig, VQModelConfig, VQObjectiveConfig)
from vidray.models.build import build_net, size_figures
from vidray.models.evilm import EVILM_FLAVOURS, block_mask, clip_masks, mvm_loss, zero_regions
from vidray.models.vq import (VQ_FLAVOURS, VQTokenizer, VQTrainModel, caption_words, focal_loss, patches_of,
                              quantize)
from vidray.objectives.allinone import PretrainModel
from vidray.train.frames_system import mvm_settings

TINY = FramesModelConfig(arch="evilm", flavour="tiny", image_size=64, num_frames=4, max_text_tokens=16)


def test_block_masks_are_rectangles_that_never_exceed_the_ratio():
    g = torch.Generator().manual_seed(0)
    masks = [block_mask(8, 0.4, g) for _ in range(300)]
    target = round(0.4 * 64)
    counts = torch.tensor([int(m.sum()) for m in masks], dtype=torch.float)
    assert counts.max() <= target and counts.mean() >= 0.9 * target
    # Blocks, not scattered regions: a masked region's 4-neighbours are masked far more often
    # than the 40% an independent draw would give.
    neighbours = []
    for m in masks:
        padded = F.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
        around = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        inside = F.pad(torch.ones(8, 8)[None, None], (1, 1, 1, 1))[0, 0]
        slots = inside[:-2, 1:-1] + inside[2:, 1:-1] + inside[1:-1, :-2] + inside[1:-1, 2:]
        neighbours.append((around[m] / slots[m]).mean())
    assert torch.stack(neighbours).mean() > 0.6
    # Reproducible from the generator's seed.
    again = torch.Generator().manual_seed(0)
    assert torch.equal(block_mask(8, 0.4, again), masks[0])


def test_clip_masks_draw_each_frame_independently():
    masks = clip_masks(3, 4, 4, 0.4, torch.Generator().manual_seed(1))
    assert masks.shape == (3, 4, 16) and masks.dtype == torch.bool
    assert len({tuple(m.tolist()) for m in masks.flatten(0, 1)}) > 1


def test_zero_regions_zeroes_exactly_the_pixels_of_masked_regions():
    frames = torch.randn(2, 3, 3, 32, 32) + 5.0
    masks = clip_masks(2, 3, 4, 0.4, torch.Generator().manual_seed(2))
    out = zero_regions(frames, masks)
    expected = frames.clone()
    for b in range(2):
        for t in range(3):
            for r in range(16):
                if masks[b, t, r]:
                    row, col = divmod(r, 4)
                    expected[b, t, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 0.0
    assert torch.equal(out, expected)


def test_mvm_loss_is_cross_entropy_over_masked_regions_only():
    logits, codes = torch.randn(2, 6, 10), torch.randint(10, (2, 6))
    masks = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    loss, accuracy = mvm_loss(logits, codes, masks)
    terms = [-torch.log_softmax(logits[b, i], -1)[codes[b, i]] for b in range(2) for i in range(6) if masks[b, i]]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    hits = [float(logits[b, i].argmax() == codes[b, i]) for b in range(2) for i in range(6) if masks[b, i]]
    assert accuracy.item() == pytest.approx(sum(hits) / 3)
    none, _ = mvm_loss(logits.requires_grad_(), codes, torch.zeros_like(masks))
    assert none.item() == 0.0 and not torch.isnan(none)


def test_quantize_picks_the_nearest_unit_code_and_passes_gradients_straight_through():
    codebook = torch.randn(50, 8, requires_grad=True)
    z = F.normalize(torch.randn(4, 5, 8), dim=-1).requires_grad_()
    ids, q = quantize(z, codebook)
    unit = F.normalize(codebook.detach(), dim=-1)
    for i in range(4):
        for j in range(5):
            distances = ((z[i, j].detach() - unit) ** 2).sum(-1)
            assert ids[i, j] == distances.argmin() and torch.allclose(q[i, j], unit[ids[i, j]])
    # Straight through: d(z + sg(q - z))/dz is the identity; the codebook term reaches the codes.
    (z + (q - z).detach()).sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    F.mse_loss(q, z.detach()).backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0


def test_focal_loss_matches_a_naive_sum_over_words():
    logits = torch.randn(3, 12)
    targets = torch.rand(3, 12) < 0.3
    targets[0, 0] = True
    gamma = 1.5
    total = 0.0
    for b in range(3):
        row = 0.0
        for k in range(12):
            p = torch.sigmoid(logits[b, k]).item()
            row += -math.log(p) if targets[b, k] else -(p ** gamma) * math.log(1 - p)
        total += row / max(1, int(targets[b].sum()))
    assert focal_loss(logits, targets, gamma).item() == pytest.approx(total / 3, rel=1e-5)


def test_patches_and_caption_words_match_loops():
    frames = torch.randn(2, 3, 3, 8, 8)
    patches = patches_of(frames, 4)
    assert patches.shape == (2, 12, 48)
    for t in range(3):
        for r in range(4):
            row, col = divmod(r, 2)
            block = frames[1, t, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4].reshape(-1)
            assert torch.equal(patches[1, t * 4 + r], block)
    ids = torch.tensor([[101, 7, 9, 7, 102, 0], [101, 5, 102, 0, 0, 0]])
    words = caption_words(ids, ids != 0, 12, (0, 101, 102))
    assert words.nonzero().tolist() == [[0, 7], [0, 9], [1, 5]]


def test_vq_training_loss_moves_codebook_and_encoder():
    cfg = VQModelConfig(flavour="tiny", image_size=32, num_frames=2, patch=16, codebook_size=16, code_dim=8)
    tokenizer = VQTokenizer(VQ_FLAVOURS["tiny"], cfg, vocab_size=40)
    model = VQTrainModel(tokenizer, VQObjectiveConfig())
    frames = torch.randn(3, 2, 3, 32, 32)
    words = torch.zeros(3, 40, dtype=torch.bool)
    words[:, 5] = True
    loss, logs = model(frames, words)
    loss.backward()
    assert tokenizer.codebook.grad.abs().sum() > 0 and tokenizer.to_code.weight.grad.abs().sum() > 0
    assert 1 <= logs["codes_used"] <= 16 and tokenizer.codes(frames).shape == (3, 8)
    # The semantic head starts at the prior p = 1/vocab: the word loss opens near log(vocab).
    assert logs["word_loss"] < 2 * math.log(40)
    pixel = VQTokenizer(VQ_FLAVOURS["tiny"], VQModelConfig(kind="pixel", flavour="tiny", image_size=32, num_frames=2,
                                                           patch=16, codebook_size=16, code_dim=8), 40)
    loss, logs = VQTrainModel(pixel, VQObjectiveConfig())(frames)
    assert "pixel_loss" in logs and loss.item() > 0


def test_evilm_layout_padding_and_single_modality_passes():
    net = build_net(TINY).eval()
    frames = torch.randn(2, 4, 3, 64, 64)
    ids = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    mask = ids != 0
    states = net.backbone(frames, ids, mask)
    grid = 64 // EVILM_FLAVOURS["tiny"].stride
    assert states.shape == (2, 4 + 4 * grid * grid, net.backbone.hidden_size)
    # Padding the text changes nothing for the real tokens.
    wider = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    padded = net.backbone(frames, wider, wider != 0)
    assert torch.allclose(padded[:, :3], states[:, :3], atol=1e-5)
    assert torch.allclose(padded[:, 7:], states[:, 4:], atol=1e-5)
    # Retrieval's video side never sees text; its text side never sees frames.
    assert torch.allclose(net.encode_video(frames), net.encode_video(frames.clone()))
    assert net.encode_text(ids, mask).shape == (2, TINY.embed_dim)
    assert net.mlm_logits(states[:, :4]).shape[-1] == net.backbone.word_embed.num_embeddings


def test_pretrain_model_adds_mvm_on_masked_frames():
    net = build_net(TINY)
    model = PretrainModel(net, vtm_weight=1.0, mvm_codes=32)
    frames, ids = torch.randn(2, 4, 3, 64, 64), torch.tensor([[101, 7, 8, 102], [101, 9, 10, 102]])
    masks = clip_masks(2, 4, 4, 0.4, torch.Generator().manual_seed(0))
    loss, logs = model(frames, ids, ids, ids != 0, torch.full_like(ids, -100), torch.tensor([True, False]),
                       masks, torch.randint(32, (2, 64)))
    loss.backward()
    assert {"mlm_loss", "vtm_loss", "mvm_loss", "mvm_accuracy"} <= set(logs)
    assert logs["mvm_loss"] == pytest.approx(math.log(32), rel=0.3)  # near uniform at the start
    assert model.mvm[0].weight.grad.abs().sum() > 0


def test_size_figures_of_the_paper_flavour():
    figures = size_figures(FramesModelConfig(arch="evilm", flavour="base", image_size=256, num_frames=4,
                                             max_text_tokens=40))
    # The paper: 16M parameters in all (EdgeNeXt-small 5.6M, tiny BERT, 4 blocks of 384).
    assert 12e6 < figures["model.parameters"] < 20e6


def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="model.image_size"):
        build_net(FramesModelConfig(arch="evilm", flavour="base", image_size=64 + 16))
    allinone = FramesPretrainConfig(model=FramesModelConfig(arch="allinone"),
                                    objective=FramesObjectiveConfig(mvm_tokenizer="semantic"))
    with pytest.raises(ConfigError, match="objective.mvm_tokenizer"):
        mvm_settings(allinone)
    missing = FramesPretrainConfig(model=TINY, objective=FramesObjectiveConfig(mvm_tokenizer="pixel"),
                                   data=FramesDataConfig(vq={"semantic": "/nowhere"}))
    with pytest.raises(ConfigError, match=r"data.vq.*'pixel'"):
        mvm_settings(missing)
    assert mvm_settings(FramesPretrainConfig(model=TINY)) is None


def test_retrieval_training_leaves_no_trainable_parameter_without_gradient():
    """DDP fails on trainable parameters a step never reaches. Retrieval's text-only and video-only
    passes go through the decoder (the paper's fast retrieval), so every parameter but the MLM, VTM
    and QA heads gets a gradient."""
    from vidray.objectives.allinone import RetrievalModel

    model = RetrievalModel(build_net(TINY))
    ids = torch.tensor([[101, 7, 8, 102], [101, 9, 10, 102]])
    loss, _ = model(torch.randn(2, 4, 3, 64, 64), ids, ids != 0)
    loss.backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []
    assert model.net.backbone.blocks[0].attention.in_proj_weight.grad.abs().sum() > 0


def test_dead_codes_are_moved_onto_encoder_outputs_after_patience_steps():
    cfg = VQModelConfig(flavour="tiny", image_size=32, num_frames=1, patch=16, codebook_size=8, code_dim=4)
    tokenizer = VQTokenizer(VQ_FLAVOURS["tiny"], cfg, vocab_size=10)
    z = F.normalize(torch.randn(2, 4, 4), dim=-1)
    ids = torch.zeros(2, 4, dtype=torch.long)            # every region picked code 0
    assert tokenizer.restart_dead_codes(ids, z, patience=3) == 0
    assert tokenizer.restart_dead_codes(ids, z, patience=3) == 0
    before = tokenizer.codebook.detach().clone()
    assert tokenizer.restart_dead_codes(ids, z, patience=3) == 7   # codes 1..7 idle for 3 steps
    moved = tokenizer.codebook.detach()
    assert torch.equal(moved[0], before[0])
    pool = z.flatten(0, 1)
    for code in moved[1:]:
        assert ((pool - code).norm(dim=-1).min()) < 0.1          # near one of this batch's outputs
    assert tokenizer.idle_steps.tolist() == [0] * 8
