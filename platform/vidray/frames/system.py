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

from vidray.config import ConfigError
from vidray.frames.allinone import ALLINONE_FLAVOURS, AllInOne, AllInOneHeads
from vidray.frames.data import IGNORE_INDEX, collate
from vidray.models.weights import text_tokenizer
from vidray.masking import corrupt, random_token_ids

RETRIEVAL_TEMPERATURE = 0.05


def build_net(model_cfg, num_answers: int = 0) -> nn.Module:
    """The model of ``model.arch`` with its heads (All-in-one: ``num_answers`` > 0 adds the QA
    classifier; LAVENDER has the one MLM head whatever the task)."""
    vocab = len(text_tokenizer(model_cfg.tokenizer))
    if model_cfg.image_size % 16:
        raise ConfigError("model.image_size", f"{model_cfg.image_size} is not a multiple of the 16-px patches")
    if model_cfg.arch == "lavender":
        from vidray.frames.lavender import LAVENDER_FLAVOURS, Lavender

        # Room for the "answer: [MASK]" a task appends to the text.
        return Lavender(LAVENDER_FLAVOURS[model_cfg.flavour], vocab, model_cfg.image_size, model_cfg.num_frames,
                        model_cfg.max_text_tokens + 8)
    if model_cfg.arch == "evilm":
        from vidray.frames.evilm import EVILM_FLAVOURS, EViLM

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
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    return {"model.parameters": sum(p.numel() for p in net.parameters()),
            "model.gflops_per_clip": round(counter.get_total_flops() / 1e9, 4)}


def freeze(*modules: nn.Module | nn.Parameter | None) -> None:
    for m in modules:
        if m is None:
            continue
        for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()):
            p.requires_grad_(False)


def mask_text(text_ids: torch.Tensor, text_mask: torch.Tensor, prob: float, mask_id: int, vocab: int,
              generator: torch.Generator, special: tuple[int, ...],
              always_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the real tokens chosen; of those 80% [MASK], 10% random (from the
    whole vocabulary, :mod:`vidray.masking`'s rule, shared with VLM), 10% kept (``always_mask``:
    all [MASK], LAVENDER's). Returns (inputs, targets with IGNORE_INDEX where nothing is predicted)."""
    candidates = text_mask & ~torch.isin(text_ids, torch.tensor(special))
    chosen = candidates & (torch.rand(text_ids.shape, generator=generator) < prob)
    targets = text_ids.masked_fill(~chosen, IGNORE_INDEX)
    roll = torch.rand(text_ids.shape, generator=generator)
    if always_mask:
        roll.zero_()
    random_ids = random_token_ids(text_ids.shape, vocab, generator, text_ids.device)
    return corrupt(text_ids, chosen, roll, random_ids, mask_id), targets


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
        from vidray.frames.evilm import mvm_loss, zero_regions

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


def gather_across_workers(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every worker's ``x`` stacked in rank order, gradients flowing back to the worker that made
    each row, and where this worker's rows start. Without a process group: ``x`` and 0. (The
    training loop drops incomplete batches, so every worker holds the same number of rows.)"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x)), dist.get_rank() * len(x)


class RetrievalModel(nn.Module):
    """Contrastive loss both ways against the clips and texts of *every* worker's batch (as CLIP
    trains): with 2 workers each text meets twice the negatives a per-worker loss would give it."""

    def __init__(self, net: AllInOneHeads):
        super().__init__()
        self.net = net
        freeze(net.mlm_transform, net.mlm_bias, net.vtm)

    def forward(self, frames, text_ids, text_mask):
        text, video = self.net.encode_text(text_ids, text_mask), self.net.encode_video(frames)
        loss, t2v, target = contrastive_loss(text, video)
        with torch.no_grad():
            accuracy = (t2v.argmax(1) == target).float().mean()
        return loss, {"t2v_batch_accuracy": accuracy.item()}


def contrastive_loss(text: torch.Tensor, video: torch.Tensor):
    """This worker's rows against every worker's, both ways: (loss, text->video logits, targets)."""
    all_text, offset = gather_across_workers(text)
    all_video, _ = gather_across_workers(video)
    t2v = (text @ all_video.T).float() / RETRIEVAL_TEMPERATURE
    v2t = (video @ all_text.T).float() / RETRIEVAL_TEMPERATURE
    target = torch.arange(len(text), device=text.device) + offset
    return (F.cross_entropy(t2v, target) + F.cross_entropy(v2t, target)) / 2, t2v, target


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
            from vidray.frames.evilm import clip_masks

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
        net = build_net(cfg.model, len(cfg.answers) if cfg.task == "qa" else 0)
        if cfg.init_from:
            init_from(net, cfg.init_from, cfg.model)
        self.model = (QAModel(net) if cfg.task == "qa" else RetrievalModel(net)).to(device)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=tok.pad_token_id)

    def training_step(self, batch: dict):
        return self.model(**batch)


def init_from(net: nn.Module, checkpoint: str, model_cfg) -> None:
    """Copy the weights of a pre-training (or fine-tuning) checkpoint into ``net``; a task head the
    checkpoint lacks (the QA classifier) keeps its fresh initialisation."""
    from vidray.train.job import load_state, require_same_model

    state = load_state(checkpoint)
    require_same_model(state, model_cfg)
    weights = {k[len("net."):]: v for k, v in state["model"].items()
               if k.startswith("net.") and not k.startswith("net.qa.")}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("qa.") for k in missing):
        raise ConfigError("init_from", f"{checkpoint} does not hold this model's weights "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def mvm_settings(cfg) -> dict | None:
    """E-ViLM's MVM targets: the manifest ``info`` of the vq set ``objective.mvm_tokenizer`` names
    in ``data.vq`` (codebook size, region grid), checked against the model; None without MVM."""
    choice = cfg.objective.mvm_tokenizer
    if choice == "none":
        return None
    if cfg.model.arch != "evilm":
        raise ConfigError("objective.mvm_tokenizer", f"masked video modelling is E-ViLM's; {cfg.model.arch} "
                          "pre-trains with MLM + VTM: set it to none")
    if choice not in cfg.data.vq:
        raise ConfigError("data.vq", f"has no {choice!r} entry for objective.mvm_tokenizer={choice}: give "
                          f"data.vq.{choice}=URI of a vq feature set (`vidray extract` with extractor vq), "
                          "or set objective.mvm_tokenizer=none")
    from vidray.feature_store.store import open_version
    from vidray.frames.evilm import EVILM_FLAVOURS

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


def build_pretrain_system(cfg, device):
    if cfg.model.arch == "lavender":
        from vidray.frames.lavender_tasks import LavenderPretrainSystem

        return LavenderPretrainSystem(cfg, device)
    return FramesPretrainSystem(cfg, device)


def build_finetune_system(cfg, device):
    if cfg.model.arch == "lavender":
        from vidray.frames.lavender_tasks import LavenderFinetuneSystem

        net = build_net(cfg.model)
        if cfg.init_from:
            init_from(net, cfg.init_from, cfg.model)
        return LavenderFinetuneSystem(cfg, net, device)
    return FramesFinetuneSystem(cfg, device)
