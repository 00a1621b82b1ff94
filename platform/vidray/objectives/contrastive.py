"""The contrastive loss, one copy for every model that retrieves by two encoders (VLM, All-in-one,
E-ViLM): each text's own clip is the positive among the batch's clips (InfoNCE).

The papers' official codes differ in three ways, each an argument here:
- VLM (MMPT): text -> video only, over the worker's own batch, no temperature:
  ``contrastive_loss(text, video)``.
- All-in-one (and E-ViLM, which fine-tunes the same way): both directions, against the batch of
  *every* worker (gathered, as CLIP trains), logits divided by a temperature:
  ``contrastive_loss(text, video, temperature=0.05, both_ways=True, across_workers=True)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_across_workers(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every worker's ``x`` stacked in rank order, gradients flowing back to the worker that made
    each row, and where this worker's rows start. Without a process group: ``x`` and 0. (The
    training loop drops incomplete batches, so every worker holds the same number of rows.)"""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather  # differentiable; only with a process group

    return torch.cat(all_gather(x)), dist.get_rank() * len(x)


def contrastive_loss(text: torch.Tensor, video: torch.Tensor, temperature: float = 1.0, both_ways: bool = False,
                     across_workers: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, text -> video logits ``[rows, candidates]``, each row's target column). Row i of
    ``text`` and of ``video`` belong together; ``both_ways`` averages in the video -> text loss."""
    all_text, all_video, offset = text, video, 0
    if across_workers:
        all_text, offset = gather_across_workers(text)
        all_video, _ = gather_across_workers(video)
    t2v = (text @ all_video.T).float() / temperature
    target = torch.arange(len(text), device=text.device) + offset
    loss = F.cross_entropy(t2v, target)
    if both_ways:
        v2t = (video @ all_text.T).float() / temperature
        loss = (loss + F.cross_entropy(v2t, target)) / 2
    return loss, t2v, target
