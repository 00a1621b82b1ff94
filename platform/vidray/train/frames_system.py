"""Training systems of the frames models: a model + its objective behind ``training_step(batch)``.

Pre-training (All-in-one, E-ViLM): MLM (15% of text tokens, 80/10/10) on each clip's own frames +
video-text matching in a second pass on whole text, where half of the clips get another clip's
frames (the batch rolled by one) and the text [CLS] state says match or not; E-ViLM adds masked
video modelling on the first pass. Fine-tuning: ``retrieval`` (contrastive loss over
text-only and video-only passes, both directions) or ``qa`` (a classifier over the answer
vocabulary on a joint pass of question + frames).

The loss is computed inside one ``nn.Module`` forward so DDP wraps everything that touches
parameters; heads a task never reads are frozen (DDP would wait for their gradients).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vidray.archs import frames_arch
from vidray.checkpoint import init_from
from vidray.config import ConfigError
from vidray.data.frames import collate
from vidray.models.allinone import AllInOneHeads
from vidray.models.build import build_net
from vidray.models.evilm import EVILM_FLAVOURS, clip_masks, mvm_loss, zero_regions
from vidray.models.vq import VQ_FLAVOURS, VQTokenizer, VQTrainModel, caption_words
from vidray.models.weights import text_tokenizer
from vidray.objectives.contrastive import contrastive_loss
from vidray.objectives.masking import IGNORE_INDEX, mask_text
from vidray.train.lavender_tasks import LavenderFinetuneSystem, LavenderPretrainSystem

RETRIEVAL_TEMPERATURE = 0.05


def freeze(*modules: nn.Module | nn.Parameter | None) -> None:
    for m in modules:
        if m is None:
            continue
        for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()):
            p.requires_grad_(False)


class PretrainModel(nn.Module):
    """Two joint passes, as ViLT and All-in-one do: MLM on the clips' own frames with masked text,
    VTM on whole text where half of the clips see the next clip's frames. With ``mvm_codes``
    (E-ViLM), the first pass also sees block-masked frames and a head predicts the VQ code of each
    masked region from the decoder's region states (MVM)."""

    def __init__(self, net: AllInOneHeads, vtm_weight: float, mvm_codes: int = 0, mvm_weight: float = 1.0):
        super().__init__()
        self.net, self.vtm_weight, self.mvm_weight = net, vtm_weight, mvm_weight
        h = net.backbone.hidden_size
        self.mvm = (nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=1e-12), nn.Linear(h, mvm_codes))
                    if mvm_codes else None)
        freeze(net.text_proj, net.video_proj)

    def forward(self, frames, text_ids, masked_ids, text_mask, mlm_targets, matched, mvm_masks=None, vq_codes=None):
        inputs = frames if self.mvm is None else zero_regions(frames, mvm_masks)
        states = self.net.backbone(inputs, masked_ids, text_mask)
        lt = masked_ids.shape[1]
        logits = self.net.mlm_logits(states[:, :lt])
        mlm = F.cross_entropy(logits.float().flatten(0, 1), mlm_targets.flatten(), ignore_index=IGNORE_INDEX)
        mlm = torch.nan_to_num(mlm)  # a batch with no masked token
        paired = torch.where(matched.view(-1, 1, 1, 1, 1), frames, frames.roll(1, dims=0))
        vtm_logits = self.net.vtm(self.net.backbone(paired, text_ids, text_mask)[:, 0])
        vtm = F.cross_entropy(vtm_logits.float(), matched.long())
        with torch.no_grad():
            vtm_accuracy = (vtm_logits.argmax(-1) == matched.long()).float().mean()
        loss = mlm + self.vtm_weight * vtm
        logs = {"mlm_loss": mlm.item(), "vtm_loss": vtm.item(), "vtm_accuracy": vtm_accuracy.item()}
        if self.mvm is not None:
            mvm, mvm_accuracy = mvm_loss(self.mvm(states[:, lt:]), vq_codes, mvm_masks.flatten(1))
            loss = loss + self.mvm_weight * mvm
            logs.update(mvm_loss=mvm.item(), mvm_accuracy=mvm_accuracy.item())
        return loss, logs


class RetrievalModel(nn.Module):
    """Contrastive loss both ways against the clips and texts of *every* worker's batch (as CLIP
    trains): with 2 workers each text meets twice the negatives a per-worker loss would give it."""

    def __init__(self, net: AllInOneHeads):
        super().__init__()
        self.net = net
        freeze(net.mlm_transform, net.mlm_bias, net.vtm)

    def forward(self, frames, text_ids, text_mask):
        text, video = self.net.encode_text(text_ids, text_mask), self.net.encode_video(frames)
        loss, t2v, target = contrastive_loss(text, video, temperature=RETRIEVAL_TEMPERATURE, both_ways=True,
                                             across_workers=True)
        with torch.no_grad():
            accuracy = (t2v.argmax(1) == target).float().mean()
        return loss, {"t2v_batch_accuracy": accuracy.item()}


class QAModel(nn.Module):
    def __init__(self, net: AllInOneHeads):
        super().__init__()
        self.net = net
        freeze(net.mlm_transform, net.mlm_bias, net.vtm, net.text_proj, net.video_proj)

    def logits(self, frames, text_ids, text_mask) -> torch.Tensor:
        return self.net.qa(self.net.backbone(frames, text_ids, text_mask)[:, 0])

    def forward(self, frames, text_ids, text_mask, answer):
        logits = self.logits(frames, text_ids, text_mask)
        loss = torch.nan_to_num(F.cross_entropy(logits.float(), answer, ignore_index=IGNORE_INDEX))
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == answer).float().mean()
        return loss, {"qa_batch_accuracy": accuracy.item()}


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
        model = self.task_model(cfg)
        if cfg.init_from:
            init_from(model.net, cfg.init_from, cfg.model, prefix="net.", fresh=("qa.",))
        self.model = model.to(device)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=tok.pad_token_id)

    @staticmethod
    def task_model(cfg) -> nn.Module:
        """The untrained module of ``cfg.task`` (evaluation loads a checkpoint's weights into it)."""
        net = build_net(cfg.model, len(cfg.answers) if cfg.task == "qa" else 0)
        return QAModel(net) if cfg.task == "qa" else RetrievalModel(net)

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


def finetuned_model(cfg) -> nn.Module:
    """The untrained module a fine-tuning run of ``cfg`` trains, for its checkpoint's weights."""
    return RECIPES[frames_arch(cfg.model.arch).recipe]["finetune"].task_model(cfg)


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
