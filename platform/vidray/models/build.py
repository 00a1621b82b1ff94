"""The frames models by ``model.arch`` (:data:`vidray.archs.FRAMES_ARCHS`: All-in-one, LAVENDER,
E-ViLM, the example), built from a FramesModelConfig, and their size figures (parameters, GFLOPs
per clip) for MLflow.

    net = build_net(cfg.model, num_answers=len(cfg.answers))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vidray.archs import frames_arch, load
from vidray.config import ConfigError
from vidray.models.weights import text_tokenizer


def build_net(model_cfg, num_answers: int = 0) -> nn.Module:
    """The model of ``model.arch`` (its ``build`` in :data:`vidray.archs.FRAMES_ARCHS`) with its
    heads; ``num_answers`` > 0 adds a QA classifier where the model has one (LAVENDER answers
    through its MLM head whatever the task)."""
    build = load(frames_arch(model_cfg.arch).build)
    if model_cfg.image_size % 16:
        raise ConfigError("model.image_size", f"{model_cfg.image_size} is not a multiple of the 16-px patches")
    return build(model_cfg, len(text_tokenizer(model_cfg.tokenizer)), num_answers)


def size_figures(model_cfg, num_answers: int = 0) -> dict[str, float]:
    """Parameter count and forward GFLOPs of one clip (joint pass, full-length text)."""
    # Train mode (no dropout anywhere): in eval mode nn.MultiheadAttention takes a fused kernel
    # the FLOP counter cannot see into.
    net = build_net(model_cfg, num_answers)
    frames = torch.zeros(1, model_cfg.num_frames, 3, model_cfg.image_size, model_cfg.image_size)
    ids = torch.ones(1, model_cfg.max_text_tokens, dtype=torch.long)
    return measure_size(net, lambda: net(frames, ids, torch.ones_like(ids, dtype=torch.bool)))  # a joint pass


def measure_size(net: nn.Module, forward) -> dict[str, float]:
    """``net``'s parameter count and the GFLOPs of one call of ``forward()`` (no gradients)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    return {"model.parameters": sum(p.numel() for p in net.parameters()),
            "model.gflops_per_clip": round(counter.get_total_flops() / 1e9, 4)}
