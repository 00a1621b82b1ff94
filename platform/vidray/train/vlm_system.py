"""The VLM pre-training system: model + masking + objective behind `training_step(batch)`.

The loss is computed inside one ``nn.Module`` forward (``Pretrainer``) so that DDP, applied by
the training loop, wraps everything that touches parameters.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vidray.config.vlm import ObjectiveConfig
from vidray.data.vlm import collate
from vidray.models.vlm import build_vlm
from vidray.objectives.vlm import (OBJECTIVES, SpecialIds, gather_predictions, mask_batch,
                                   video_candidates)


VALIDATION_MASKING = ObjectiveConfig(mmm_ratio=0.0, mlm_prob=0.15, mfm_prob=0.15)


class Pretrainer(nn.Module):
    """VLM + the chosen objective: forward(batch of masked inputs) -> (loss, logs)."""

    def __init__(self, vlm: nn.Module, objective: str):
        super().__init__()
        self.vlm, self.objective = vlm, objective

    def forward(self, masked, video_mask: torch.Tensor, text_mask: torch.Tensor):
        vlm = self.vlm
        hidden = vlm(masked.video, video_mask, masked.text_ids, text_mask, attention="full")
        video_hidden, text_hidden, text_targets = gather_predictions(hidden, masked, video_mask.shape[1])
        pos, cand = video_candidates(vlm.video_embeddings(masked.video_original), masked)
        pred_video = vlm.head_transform(video_hidden)
        if self.objective == "masked_token":
            return OBJECTIVES["masked_token"](pred_video, pos, cand, vlm.head_transform(text_hidden),
                                              text_targets, vlm.word_embeddings, vlm.lm_bias)
        return OBJECTIVES["mfm_mlm"](pred_video, pos, cand, vlm.lm_logits(text_hidden), text_targets)


class VLMSystem:
    """What the training loop needs: ``model``, ``collate``, ``prepare`` and ``training_step``."""

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        vlm = build_vlm(cfg.model)
        self.special = SpecialIds(vocab_size=vlm.vocab_size)
        self.model = Pretrainer(vlm, cfg.objective.name).to(device)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
        self.collate = partial(collate, max_video_tokens=cfg.model.max_video_tokens,
                               max_text_tokens=cfg.data.max_text_tokens, sep_id=self.special.sep,
                               pad_id=self.special.pad)

    def prepare(self, batch: dict) -> dict:
        """Masking, on the CPU batch before the loop copies it to the device: it draws from a CPU
        generator, so a seed gives the same masks on any device."""
        return {"masked": mask_batch(batch, self.cfg.objective, self.special, self.generator),
                "video_mask": batch["video_mask"], "text_mask": batch["text_mask"]}

    def training_step(self, batch: dict):
        """``batch``: :meth:`prepare`'s, on the model's device."""
        return self.model(batch["masked"], batch["video_mask"], batch["text_mask"])

    def validation_step(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        """The loss under one fixed protocol whatever the run's own masking: 15% of text and of
        video tokens, no whole-modality masking. Runs that differ in ``objective.mmm_ratio`` or
        masking rates are then scored alike (the training loss of an MMM-heavy run is higher
        because its task is harder, not because its model is worse)."""
        cpu = {k: v.cpu() for k, v in batch.items()}
        masked = mask_batch(cpu, VALIDATION_MASKING, self.special, generator)
        _, logs = self.model(masked.to(batch["video"].device), batch["video_mask"], batch["text_mask"])
        return {k: v for k, v in logs.items() if not k.startswith("n_")}  # counts do not average


def build_system(cfg, device) -> VLMSystem:
    return VLMSystem(cfg, device)
