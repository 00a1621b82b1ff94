"""The frames models by ``model.arch``: All-in-one, LAVENDER, E-ViLM, built from a FramesModelConfig,
and their size figures (parameters, GFLOPs per clip) for MLflow.

    net = build_net(cfg.model, num_answers=len(cfg.answers))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vidray.config import ConfigError
from vidray.frames.allinone import ALLINONE_FLAVOURS, AllInOne, AllInOneHeads
from vidray.frames.evilm import EVILM_FLAVOURS, EViLM
from vidray.frames.lavender import LAVENDER_FLAVOURS, Lavender
from vidray.models.weights import text_tokenizer


def build_net(model_cfg, num_answers: int = 0) -> nn.Module:
    """The model of ``model.arch`` with its heads (All-in-one: ``num_answers`` > 0 adds the QA
    classifier; LAVENDER has the one MLM head whatever the task)."""
    vocab = len(text_tokenizer(model_cfg.tokenizer))
    if model_cfg.image_size % 16:
        raise ConfigError("model.image_size", f"{model_cfg.image_size} is not a multiple of the 16-px patches")
    if model_cfg.arch == "lavender":
        # Room for the "answer: [MASK]" a task appends to the text.
        return Lavender(LAVENDER_FLAVOURS[model_cfg.flavour], vocab, model_cfg.image_size, model_cfg.num_frames,
                        model_cfg.max_text_tokens + 8)
    if model_cfg.arch == "evilm":
        dims = EVILM_FLAVOURS[model_cfg.flavour]
        if model_cfg.image_size % dims.stride:
            raise ConfigError("model.image_size", f"{model_cfg.image_size} is not a multiple of E-ViLM "
                              f"{model_cfg.flavour}'s stride {dims.stride}")
        backbone = EViLM(dims, vocab, model_cfg.image_size, model_cfg.num_frames, model_cfg.max_text_tokens)
        return AllInOneHeads(backbone, num_answers, model_cfg.embed_dim)
    if model_cfg.flavour not in ALLINONE_FLAVOURS:
        raise ConfigError("model.flavour", f"unknown flavour {model_cfg.flavour!r}; choose one of "
                          f"{sorted(ALLINONE_FLAVOURS)}")
    dims = ALLINONE_FLAVOURS[model_cfg.flavour]
    backbone = AllInOne(dims, vocab, model_cfg.image_size, model_cfg.num_frames, model_cfg.max_text_tokens,
                        temporal_roll=model_cfg.temporal_roll)
    return AllInOneHeads(backbone, num_answers, model_cfg.embed_dim)


def size_figures(model_cfg, num_answers: int = 0) -> dict[str, float]:
    """Parameter count and forward GFLOPs of one clip (joint pass, full-length text)."""
    # Train mode (no dropout anywhere): in eval mode nn.MultiheadAttention takes a fused kernel
    # the FLOP counter cannot see into.
    net = build_net(model_cfg, num_answers)
    frames = torch.zeros(1, model_cfg.num_frames, 3, model_cfg.image_size, model_cfg.image_size)
    ids = torch.ones(1, model_cfg.max_text_tokens, dtype=torch.long)
    joint = net if model_cfg.arch == "lavender" else net.backbone  # one pass over text + frames
    return measure_size(net, lambda: joint(frames, ids, torch.ones_like(ids, dtype=torch.bool)))


def measure_size(net: nn.Module, forward) -> dict[str, float]:
    """``net``'s parameter count and the GFLOPs of one call of ``forward()`` (no gradients)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    return {"model.parameters": sum(p.numel() for p in net.parameters()),
            "model.gflops_per_clip": round(counter.get_total_flops() / 1e9, 4)}
