"""Training systems of the frames models: what the training loop needs (``model``, ``collate``,
``training_step``, ...) for each recipe's pre-training and fine-tuning, and for the VQ tokenizer.
The objectives they train are :mod:`vidray.objectives.allinone` and :mod:`vidray.objectives.lavender`.
"""

from __future__ import annotations

from functools import partial

import torch

from vidray.archs import frames_arch
from vidray.checkpoint import init_from
from vidray.config import ConfigError
from vidray.data.frames import collate
from vidray.models.build import build_net
from vidray.models.evilm import EVILM_FLAVOURS, clip_masks
from vidray.models.vq import VQ_FLAVOURS, VQTokenizer, VQTrainModel, caption_words
from vidray.models.weights import text_tokenizer
from vidray.objectives.allinone import PretrainModel, task_model
from vidray.objectives.masking import mask_text
from vidray.train.lavender_system import LavenderFinetuneSystem, LavenderPretrainSystem


class FramesPretrainSystem:
    """What the training loop needs: ``model``, ``collate``, ``prepare``, ``training_step``, ``validation_step``."""

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        tok = text_tokenizer(cfg.model.tokenizer)
        self.mask_id, self.vocab = tok.mask_token_id, len(tok)
        self.special = tuple(tok.all_special_ids)
        self.mvm = mvm_settings(cfg)
        self.model = PretrainModel(build_net(cfg.model), cfg.objective.vtm_weight,
                                   self.mvm["codebook_size"] if self.mvm else 0, cfg.objective.mvm_weight).to(device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=tok.pad_token_id)

    def prepare(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Masks and pairings, on the CPU batch before the loop copies it to the device: they come
        from a CPU generator, so the same seed gives the same on any device."""
        generator = generator or self.generator
        ids, mask = batch["text_ids"], batch["text_mask"]
        inputs, targets = mask_text(ids, mask, self.cfg.objective.mlm_prob, self.mask_id, self.vocab,
                                    generator, self.special)
        matched = torch.rand(len(ids), generator=generator) < 0.5
        if len(ids) == 1:
            matched[:] = True
        out = {**batch, "masked_ids": inputs, "mlm_targets": targets, "matched": matched}
        if self.mvm:
            b, t = batch["frames"].shape[:2]
            out["mvm_masks"] = clip_masks(b, t, self.mvm["grid"], self.cfg.objective.mvm_mask_ratio, generator)
        return out

    def training_step(self, batch: dict):
        """``batch``: :meth:`prepare`'s, on the model's device."""
        return self.model(batch["frames"], batch["text_ids"], batch["masked_ids"], batch["text_mask"],
                          batch["mlm_targets"], batch["matched"], batch.get("mvm_masks"), batch.get("vq_codes"))

    def validation_step(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        from vidray.train.loop import to_device

        prepared = self.prepare({k: v.cpu() for k, v in batch.items()}, generator)
        loss, logs = self.training_step(to_device(prepared, batch["frames"].device))
        return {"loss": loss.item(), **logs}


class FramesFinetuneSystem:
    def __init__(self, cfg, device: torch.device):
        tok = text_tokenizer(cfg.model.tokenizer)
        model = task_model(cfg)
        if cfg.init_from:
            init_from(model.net, cfg.init_from, cfg.model, prefix="net.", fresh=("qa.",))
        self.model = model.to(device)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=tok.pad_token_id)

    def training_step(self, batch: dict):
        return self.model(**batch)


def mvm_settings(cfg) -> dict | None:
    """E-ViLM's MVM targets: the manifest ``info`` of the vq set ``objective.mvm_tokenizer`` names
    in ``data.vq`` (codebook size, region grid), checked against the model; None without MVM."""
    choice = cfg.objective.mvm_tokenizer
    if choice == "none":
        return None
    if not frames_arch(cfg.model.arch).masked_video:
        raise ConfigError("objective.mvm_tokenizer", f"masked video modelling is E-ViLM's; {cfg.model.arch} "
                          "pre-trains with MLM + VTM: set it to none")
    if choice not in cfg.data.vq:
        raise ConfigError("data.vq", f"has no {choice!r} entry for objective.mvm_tokenizer={choice}: give "
                          f"data.vq.{choice}=URI of a vq feature set (`vidray extract` with extractor vq), "
                          "or set objective.mvm_tokenizer=none")
    from vidray.feature_store.store import open_version

    version = open_version(cfg.data.vq[choice])
    info = version.manifest.get("info") or {}
    if version.manifest.get("extractor") != "vq" or "codebook_size" not in info:
        raise ConfigError(f"data.vq.{choice}", f"{version.uri} is not a vq feature set")
    grid = cfg.model.image_size // EVILM_FLAVOURS[cfg.model.flavour].stride
    if (info["grid"], info["num_frames"]) != (grid, cfg.model.num_frames):
        raise ConfigError(f"data.vq.{choice}", f"its codes cover {info['num_frames']} frames x "
                          f"{info['grid']}x{info['grid']} regions but the model sees {cfg.model.num_frames} "
                          f"frames x {grid}x{grid}: train the tokenizer with model.num_frames="
                          f"{cfg.model.num_frames} and image_size / patch = {grid}")
    return {**info, "uri": version.uri}


# recipe (vidray.archs.FramesArch.recipe) -> job -> its System: (cfg, device) -> what the training
# loop needs (vidray.train.loop.System).
RECIPES: dict[str, dict[str, type]] = {
    "allinone": {"pretrain": FramesPretrainSystem, "finetune": FramesFinetuneSystem},
    "lavender": {"pretrain": LavenderPretrainSystem, "finetune": LavenderFinetuneSystem},
}


def build_pretrain_system(cfg, device):
    return RECIPES[frames_arch(cfg.model.arch).recipe]["pretrain"](cfg, device)


def build_finetune_system(cfg, device):
    return RECIPES[frames_arch(cfg.model.arch).recipe]["finetune"](cfg, device)


class VQTrainSystem:
    """What the training loop needs: ``model``, ``collate``, ``training_step``, ``validation_step``."""

    def __init__(self, cfg, device: torch.device):
        tok = text_tokenizer(cfg.model.tokenizer)
        self.vocab, self.special = len(tok), tuple(tok.all_special_ids)
        tokenizer = VQTokenizer(VQ_FLAVOURS[cfg.model.flavour], cfg.model, self.vocab)
        self.model = VQTrainModel(tokenizer, cfg.objective).to(device)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=tok.pad_token_id)

    def training_step(self, batch: dict):
        words = caption_words(batch["text_ids"], batch["text_mask"], self.vocab, self.special)
        return self.model(batch["frames"], words)

    def validation_step(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        loss, logs = self.training_step(batch)
        return {"loss": loss.item(), **logs}
