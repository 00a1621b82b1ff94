"""E-ViLM: a small video-language model for one device (compact conv encoder, tiny BERT, a narrow
multi-modal decoder) and its masked video modelling (MVM).

    backbone = EViLM(EVILM_FLAVOURS["tiny"], vocab_size=30522, image_size=64, num_frames=4, ...)
    states = backbone(frames, text_ids, text_mask)     # [B, Lt + T*G*G, F]: text slots, then regions
    heads = AllInOneHeads(backbone)                     # MLM (tied), VTM, retrieval, QA: same heads

Each frame goes through a ConvNeXt/EdgeNeXt-style encoder (depthwise-conv blocks, a 4x stem and
2x downsamplings) to a ``G x G`` grid of region features; the caption goes through a tiny BERT.
Both are projected to the decoder width ``F`` and concatenated (text first, token types added),
and a few transformer blocks fuse them (REFERENCE.md). The text's [CLS] slot is the decoder's
classification token (VTM, QA): the paper attaches its own [CLS], a learned token in the same place.

The layout matches All-in-one's (text slots first; ``backbone(None, ids, mask)`` is text only and
``backbone(frames, None)[:, 0]`` a pooled video state), so :class:`AllInOneHeads` and the training
systems serve both. Fast retrieval feeds the decoder one modality at a time (the paper follows
All-in-one here): each side alone, but through the decoder. Skipping the decoder left retrieval
near chance at test scale (tiny, 64 px: median rank 19 of 74 clips, 10 through the decoder).

MVM (:func:`block_mask`, :func:`zero_regions`): BEiT-style block-wise masks over each frame's
grid (40% of regions), the masked regions' pixels set to zero, and a head on the decoder's region
states predicting the VQ tokenizer's code of each masked region (:mod:`vidray.models.vq`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidray.config import ConfigError
from vidray.models.allinone import AllInOneHeads, Block, Dims, flavour_of
from vidray.models.lavender import bert_init


@dataclass(frozen=True)
class EViLMDims:
    channels: tuple[int, ...]      # conv encoder stages (stem 4x, then 2x per later stage)
    depths: tuple[int, ...]
    text_hidden: int               # tiny BERT
    text_layers: int
    text_heads: int
    fusion: Dims                   # multi-modal decoder

    @property
    def stride(self) -> int:
        return 4 * 2 ** (len(self.channels) - 1)


# base: the paper's sizes (EdgeNeXt-small-like stages, BERT hidden 128 / 4 heads, 4 blocks of 384;
# ~16M parameters with the full BERT vocabulary). tiny: for CPU tests and the demo.
EVILM_FLAVOURS: dict[str, EViLMDims] = {
    "tiny": EViLMDims(channels=(16, 32, 64), depths=(1, 1, 1), text_hidden=32, text_layers=2, text_heads=2,
                      fusion=Dims(hidden=64, layers=2, heads=2, mlp=128, patch=16)),
    "base": EViLMDims(channels=(48, 96, 160, 304), depths=(3, 3, 9, 3), text_hidden=128, text_layers=4,
                      text_heads=4, fusion=Dims(hidden=384, layers=4, heads=6, mlp=1536, patch=32)),
}


class ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, pointwise MLP, residual (ConvNeXt's block, EdgeNeXt's conv part)."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(h)).permute(0, 3, 1, 2)


class ConvEncoder(nn.Module):
    """``[N, 3, S, S]`` -> ``[N, C, S / stride, S / stride]``."""

    def __init__(self, channels: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, stride=4), ChannelsLastNorm(channels[0], eps=1e-6)]
        for i, (width, depth) in enumerate(zip(channels, depths)):
            if i:
                layers += [ChannelsLastNorm(channels[i - 1], eps=1e-6), nn.Conv2d(channels[i - 1], width, 2, stride=2)]
            layers += [ConvBlock(width) for _ in range(depth)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EViLM(nn.Module):
    def __init__(self, dims: EViLMDims, vocab_size: int, image_size: int, num_frames: int,
                 max_text_tokens: int):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder

        if image_size % dims.stride:
            raise ValueError(f"image_size {image_size} is not a multiple of E-ViLM's stride {dims.stride}")
        self.dims, self.num_frames = dims, num_frames
        self.grid = image_size // dims.stride
        h = dims.fusion.hidden
        self.visual = ConvEncoder(dims.channels, dims.depths)
        self.visual_in = nn.Linear(dims.channels[-1], h)
        bert = BertConfig(vocab_size=vocab_size, hidden_size=dims.text_hidden, num_hidden_layers=dims.text_layers,
                          num_attention_heads=dims.text_heads, intermediate_size=4 * dims.text_hidden,
                          max_position_embeddings=max(64, max_text_tokens), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
        bert._attn_implementation = "sdpa"  # built piece by piece, transformers would not pick one
        self.text_embeddings, self.text_encoder = BertEmbeddings(bert), BertEncoder(bert)
        self.text_in = nn.Linear(dims.text_hidden, h)
        self.spatial_pos = nn.Parameter(torch.zeros(1, 1, self.grid ** 2, h))
        self.temporal_pos = nn.Parameter(torch.zeros(1, num_frames, 1, h))
        self.token_type = nn.Embedding(2, h)  # 0 text, 1 video
        self.blocks = nn.ModuleList(Block(dims.fusion) for _ in range(dims.fusion.layers))
        self.norm = nn.LayerNorm(h, eps=1e-6)
        for p in (self.spatial_pos, self.temporal_pos, self.token_type.weight):
            nn.init.trunc_normal_(p, std=0.02)
        for module in (self.text_embeddings, self.text_encoder):
            module.apply(bert_init)

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return [*self.text_encoder.layer, *self.blocks]

    @property
    def hidden_size(self) -> int:
        return self.dims.fusion.hidden

    @property
    def word_embed(self) -> nn.Embedding:
        """The word embeddings the MLM head is tied to (text width, not decoder width)."""
        return self.text_embeddings.word_embeddings

    def encode_text_tokens(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``[B, Lt, F]``: tiny BERT, projected to the decoder width."""
        extended = (1.0 - text_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        states = self.text_encoder(self.text_embeddings(input_ids=text_ids), attention_mask=extended)
        return self.text_in(states[0] if isinstance(states, tuple) else states.last_hidden_state)

    def encode_regions(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames [B, T, 3, S, S]`` -> ``[B, T * G * G, F]`` region tokens, frame-major then row-major."""
        b, t = frames.shape[:2]
        if t > self.num_frames:
            raise ValueError(f"{t} frames exceed the model's num_frames={self.num_frames}")
        grid = self.visual(frames.flatten(0, 1)).flatten(2).transpose(1, 2)          # [B*T, G*G, C]
        x = self.visual_in(grid).view(b, t, self.grid ** 2, -1) + self.spatial_pos + self.temporal_pos[:, :t]
        return x.flatten(1, 2)

    def forward(self, frames: torch.Tensor | None, text_ids: torch.Tensor | None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states. Joint pass: ``[B, Lt + T*G*G, F]``. Text only (``frames=None``):
        ``[B, Lt, F]``, slot 0 the [CLS]. Video only: ``[B, 1 + T*G*G, F]``, slot 0 the mean region
        state (what retrieval reads)."""
        parts, padding = [], []
        if text_ids is not None:
            parts.append(self.encode_text_tokens(text_ids, text_mask) + self.token_type.weight[0])
            padding.append(~text_mask)
        if frames is not None:
            regions = self.encode_regions(frames) + self.token_type.weight[1]
            parts.append(regions)
            padding.append(torch.zeros(regions.shape[:2], dtype=torch.bool, device=regions.device))
        x, padding = torch.cat(parts, dim=1), torch.cat(padding, dim=1)
        for block in self.blocks:
            x = block(x, padding)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], dim=1) if text_ids is None else x


# --- masked video modelling -----------------------------------------------------------------------

def block_mask(grid: int, ratio: float, generator: torch.Generator, min_area: int = 1,
               attempts: int = 10) -> torch.Tensor:
    """A ``[grid, grid]`` bool mask of at most ``round(ratio * grid²)`` regions made of rectangles
    (BEiT's block-wise masking): each rectangle has a random area up to what is left to mask and
    an aspect ratio log-uniform in [0.3, 1/0.3]; a rectangle is kept when it adds regions without
    overshooting. Stops when the target is reached or no rectangle fits in ``attempts`` tries."""
    target = round(ratio * grid * grid)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def draw(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator)

    while int(mask.sum()) < target:
        left = target - int(mask.sum())
        added = False
        for _ in range(attempts):
            u = draw(4)
            area = min_area + u[0].item() * (max(left, min_area) - min_area)
            aspect = math.exp(log_aspect[0] + u[1].item() * (log_aspect[1] - log_aspect[0]))
            h = min(grid, max(1, round(math.sqrt(area * aspect))))
            w = min(grid, max(1, round(math.sqrt(area / aspect))))
            top, lft = int(u[2].item() * (grid - h + 1)), int(u[3].item() * (grid - w + 1))
            block = torch.zeros_like(mask)
            block[top:top + h, lft:lft + w] = True
            new = int((block & ~mask).sum())
            if 0 < new <= left:
                mask |= block
                added = True
                break
        if not added:
            break
    return mask


def clip_masks(batch: int, frames: int, grid: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``[B, T, G*G]``: an independent block mask for every frame of every clip."""
    return torch.stack([block_mask(grid, ratio, generator).flatten()
                        for _ in range(batch * frames)]).view(batch, frames, grid * grid)


def zero_regions(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``frames [B, T, 3, S, S]`` with the pixels of every masked region (``masks [B, T, G*G]``)
    set to 0 — in the model's input scale, where 0 is mid-grey: a masked region carries nothing."""
    b, t, _, size, _ = frames.shape
    grid = math.isqrt(masks.shape[-1])
    cell = size // grid
    pixels = masks.view(b, t, grid, grid).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    return frames.masked_fill(pixels.unsqueeze(2).to(frames.device), 0.0)


def mvm_loss(logits: torch.Tensor, codes: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the codes of the masked regions only (``logits [B, N, K]``, ``codes`` and
    ``masks [B, N]``) and the accuracy there. No masked region: 0 (not NaN)."""
    chosen = masks.flatten().to(logits.device)
    if not chosen.any():
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    picked, targets = logits.flatten(0, 1)[chosen].float(), codes.flatten()[chosen]
    return F.cross_entropy(picked, targets), (picked.argmax(-1) == targets).float().mean()


def build(cfg, vocab_size: int, num_answers: int = 0) -> AllInOneHeads:
    """E-ViLM of ``cfg`` (a FramesModelConfig) wearing All-in-one's heads (the same layout);
    ``num_answers`` > 0 adds the QA classifier (vidray.archs.FRAMES_ARCHS["evilm"])."""
    dims = flavour_of(EVILM_FLAVOURS, cfg.flavour)
    if cfg.image_size % dims.stride:
        raise ConfigError("model.image_size", f"{cfg.image_size} is not a multiple of E-ViLM "
                          f"{cfg.flavour}'s stride {dims.stride}")
    backbone = EViLM(dims, vocab_size, cfg.image_size, cfg.num_frames, cfg.max_text_tokens)
    return AllInOneHeads(backbone, num_answers, cfg.embed_dim)
