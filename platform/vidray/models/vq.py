"""E-ViLM's VQ video tokenizer: frames -> one discrete code per region, the targets of MVM.

    tokenizer = VQTokenizer(VQ_FLAVOURS["tiny"], VQModelConfig(...), vocab_size)
    codes = tokenizer.codes(frames)          # [B, T * G * G] code ids, G = image_size // patch

Encoder (ViT over every frame's patches, joint space-time attention) -> a ``code_dim`` vector per
patch, l2-normalised -> the nearest code of an l2-normalised codebook (:func:`quantize`) -> a
transformer decoder over the codes. The decoder of the ``semantic`` kind predicts which words the
clip's caption holds (multi-label, :func:`focal_loss`), E-ViLM's "semantic" tokenizer; the
``pixel`` kind reconstructs each patch's pixels instead (the DALL-E-like control the tokenizer
ablation compares against). Gradients pass the quantisation straight through; the codebook term
``||sg[E(x)] - c||²`` moves the codes and the commitment term ``||E(x) - sg[c]||²`` holds the
encoder to them (REFERENCE.md). After training only the encoder and codebook are used.

`vidray train-vq CONFIG` trains one (:func:`vidray.train.frames_run.run_train_vq`, the shared Ray Train loop and MLflow);
the ``vq`` extractor caches its codes into the feature store (:mod:`vidray.feature_store.extractors`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidray.config import ConfigError
from vidray.models.allinone import Block, Dims
from vidray.models.lavender import VideoEncoder



@dataclass(frozen=True)
class VQDims:
    encoder: Dims        # its ``patch`` is replaced by the config's (the region size MVM needs)
    decoder: Dims


VQ_FLAVOURS: dict[str, VQDims] = {
    "tiny": VQDims(encoder=Dims(hidden=64, layers=2, heads=2, mlp=128, patch=16),
                   decoder=Dims(hidden=64, layers=2, heads=2, mlp=128, patch=16)),
    "base": VQDims(encoder=Dims(hidden=768, layers=12, heads=12, mlp=3072, patch=32),
                   decoder=Dims(hidden=512, layers=8, heads=8, mlp=2048, patch=32)),
}


def quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each unit vector ``z [..., D]`` among the l2-normalised rows of
    ``codebook [K, D]``: (ids ``[...]``, the codes ``[..., D]`` with gradients to the codebook).
    For unit vectors the smallest Euclidean distance is the largest dot product."""
    codes = F.normalize(codebook, dim=-1)
    ids = (z.detach() @ codes.T).argmax(-1)
    return ids, codes[ids]


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Multi-label focal loss of E-ViLM's tokenizer: ``-log p`` on the words present and
    ``-p^gamma log(1 - p)`` on the others, summed and divided by the number of words present (as
    RetinaNet normalises by positives): the paper's 1/K would make the word term ~1e-4 of the
    commitment terms with a 30k vocabulary."""
    p = torch.sigmoid(logits.float())
    positive = -F.logsigmoid(logits.float())
    negative = -(p ** gamma) * F.logsigmoid(-logits.float())
    loss = torch.where(targets, positive, negative).sum(-1)
    return (loss / targets.sum(-1).clamp(min=1)).mean()


class VQTokenizer(nn.Module):
    def __init__(self, dims: VQDims, model_cfg, vocab_size: int):
        super().__init__()
        m = model_cfg
        if m.image_size % m.patch:
            raise ConfigError("model.patch", f"{m.patch} does not divide model.image_size {m.image_size}")
        self.kind, self.patch = m.kind, m.patch
        self.grid = m.image_size // m.patch
        encoder = dataclasses.replace(dims.encoder, patch=m.patch)
        self.encoder = VideoEncoder(encoder, m.image_size, m.num_frames)
        self.to_code = nn.Linear(encoder.hidden, m.code_dim)
        self.codebook = nn.Parameter(torch.randn(m.codebook_size, m.code_dim))
        d = dims.decoder.hidden
        self.from_code = nn.Linear(m.code_dim, d)
        self.decoder_pos = nn.Parameter(torch.zeros(1, m.num_frames * self.grid ** 2, d))
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        self.decoder = nn.ModuleList(Block(dims.decoder) for _ in range(dims.decoder.layers))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab_size if m.kind == "semantic" else 3 * m.patch ** 2)
        self.register_buffer("idle_steps", torch.zeros(m.codebook_size, dtype=torch.long), persistent=False)
        if m.kind == "semantic":
            # RetinaNet's prior: every word starts rare (p = 1/vocab), else 30k negatives at p=0.5
            # open the focal loss in the thousands and swamp the first steps.
            nn.init.constant_(self.head.bias, -math.log(vocab_size))

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return list(self.decoder)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T * G * G, code_dim]`` unit vectors, frame-major then row-major regions."""
        return F.normalize(self.to_code(self.encoder(frames).flatten(1, 2)), dim=-1)

    @torch.no_grad()
    def codes(self, frames: torch.Tensor) -> torch.Tensor:
        """The tokenizer: ``frames [B, T, 3, S, S]`` -> code ids ``[B, T * G * G]``."""
        return quantize(self.encode(frames), self.codebook)[0]

    @torch.no_grad()
    def restart_dead_codes(self, ids: torch.Tensor, z: torch.Tensor, patience: int) -> int:
        """Codes no region of any worker's batch picked for ``patience`` steps are moved onto
        random encoder outputs of this batch (rank 0's, broadcast so replicas stay equal).
        Without it the codebook collapses: at 150 demo steps one code took 99.7% of regions and
        MVM had nothing to predict."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        counts = torch.bincount(ids.flatten(), minlength=len(self.codebook))
        if distributed:
            dist.all_reduce(counts)
        self.idle_steps.copy_(torch.where(counts > 0, torch.zeros_like(self.idle_steps), self.idle_steps + 1))
        dead = (self.idle_steps >= patience).nonzero().flatten()
        if len(dead) == 0:
            return 0
        pool = z.detach().flatten(0, -2)
        picked = pool[torch.randint(len(pool), (len(dead),), device=pool.device)]
        self.codebook.data[dead] = picked + 0.01 * torch.randn_like(picked)
        if distributed:
            dist.broadcast(self.codebook.data, src=0)
        self.idle_steps[dead] = 0
        return len(dead)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode(frames)
        ids, q = quantize(z, self.codebook)
        x = self.from_code(z + (q - z).detach()) + self.decoder_pos[:, :z.shape[1]]  # straight through
        for block in self.decoder:
            x = block(x, None)
        x = self.decoder_norm(x)
        out = self.head(x.mean(1)) if self.kind == "semantic" else self.head(x)
        return {"ids": ids, "z": z, "q": q, "out": out}


def patches_of(frames: torch.Tensor, patch: int) -> torch.Tensor:
    """``frames [B, T, 3, S, S]`` -> ``[B, T * G * G, 3 * patch²]`` in the encoder's region order."""
    b, t, c, s, _ = frames.shape
    g = s // patch
    x = frames.reshape(b, t, c, g, patch, g, patch).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, t * g * g, c * patch * patch)


def caption_words(text_ids: torch.Tensor, text_mask: torch.Tensor, vocab: int, special: tuple[int, ...]) -> torch.Tensor:
    """Multi-hot ``[B, vocab]`` of the word pieces each caption holds (special tokens left out)."""
    keep = text_mask & ~torch.isin(text_ids, torch.tensor(special, device=text_ids.device))
    words = torch.zeros(len(text_ids), vocab, dtype=torch.bool, device=text_ids.device)
    rows = torch.arange(len(text_ids), device=text_ids.device).unsqueeze(1).expand_as(text_ids)
    words[rows[keep], text_ids[keep]] = True
    return words


class VQTrainModel(nn.Module):
    def __init__(self, tokenizer: VQTokenizer, objective):
        super().__init__()
        self.tokenizer, self.objective = tokenizer, objective

    def forward(self, frames, words: torch.Tensor | None = None):
        out = self.tokenizer(frames)
        z, q = out["z"], out["q"]
        codebook = F.mse_loss(q, z.detach())
        commitment = F.mse_loss(z, q.detach())
        if self.tokenizer.kind == "semantic":
            reconstruction = focal_loss(out["out"], words, self.objective.focal_gamma)
            name = "word_loss"
        else:
            reconstruction = F.mse_loss(out["out"].float(), patches_of(frames, self.tokenizer.patch))
            name = "pixel_loss"
        loss = reconstruction + codebook + self.objective.commitment * commitment
        restarted = (self.tokenizer.restart_dead_codes(out["ids"], z, self.objective.dead_code_patience)
                     if self.training and self.objective.dead_code_patience else 0)
        with torch.no_grad():
            counts = torch.bincount(out["ids"].flatten(), minlength=self.tokenizer.codebook.shape[0]).float()
            share = counts / counts.sum()
            perplexity = torch.exp(-(share[share > 0] * share[share > 0].log()).sum())
        return loss, {name: reconstruction.item(), "commitment_loss": commitment.item(),
                      "codes_used": int((counts > 0).sum()), "code_perplexity": perplexity.item(),
                      "codes_restarted": restarted}
