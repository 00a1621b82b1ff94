"""All-in-one: one transformer over text tokens and per-frame ViT patches, for one device.

    model = AllInOne(ALLINONE_FLAVOURS["tiny"], vocab_size=30522)
    states = model(frames, text_ids, text_mask)            # joint pass: [B, Lt + P + 1, H]
    text_vec, video_vec = model.encode_text(ids, mask), model.encode_video(frames)   # fast retrieval

Sequences are built per frame (REFERENCE.md): ``[text tokens] [visual CLS, patches]`` with the
text repeated for each of the T frames, so a batch of B clips is ``B * T`` sequences. Visual
tokens carry spatial position, a learned per-frame temporal embedding and token type 1; text
carries word + position embeddings and token type 0. The states of the T sequences are averaged
at the end, which is where the frames meet, together with **temporal token rolling**: before
every block, in passes that carry both modalities, a few visual tokens of each frame are swapped
with those of the neighbouring frames (:func:`temporal_roll`). The rolling has no parameters,
so a text-only or video-only pass (fast retrieval) runs the same blocks without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidray.config import ConfigError


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    mlp: int
    patch: int


# tiny: for CPU tests and the demo; base: ViT-B/16 sizes of the paper's All-in-one-B.
ALLINONE_FLAVOURS: dict[str, Dims] = {
    "tiny": Dims(hidden=64, layers=2, heads=2, mlp=128, patch=16),
    "base": Dims(hidden=768, layers=12, heads=12, mlp=3072, patch=16),
}


def temporal_roll(visual: torch.Tensor) -> torch.Tensor:
    """``visual [B, T, 1 + P, H]`` (visual CLS then P patches per frame) with, for
    ``fold = (1 + P) // 8``, tokens ``1 .. fold`` rolled +1 along time (frame t takes frame t-1's,
    cyclic) and the last ``fold`` tokens rolled -1; the CLS and the other patches stay. A
    permutation: no parameters."""
    # The official TemporalRoll (AllInOne/modules/temporal_roll.py) divides the length of the
    # whole visual part, CLS included: (1 + P) // 8. It equals P // 8 on square grids (P = n * n is
    # never 7 mod 8) and differs on others, e.g. 3 x 5 patches: fold 2, not 1 (docs/fidelity.md).
    fold = visual.shape[2] // 8
    # fold 0 (under 7 patches): the official slices x[:, :, -0:], the whole frame, and rolls every
    # token, CLS included, by -1, a slicing accident against the rule of CLS kept; nothing moves here.
    if fold == 0 or visual.shape[1] == 1:
        return visual
    forward = visual[:, :, 1:fold + 1].roll(1, dims=1)
    backward = visual[:, :, -fold:].roll(-1, dims=1)
    return torch.cat([visual[:, :, :1], forward, visual[:, :, fold + 1:-fold], backward], dim=2)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (ViT's), with a key-padding mask."""

    def __init__(self, dims: Dims):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dims.hidden, eps=1e-6), nn.LayerNorm(dims.hidden, eps=1e-6)
        self.attention = nn.MultiheadAttention(dims.hidden, dims.heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dims.hidden, dims.mlp), nn.GELU(), nn.Linear(dims.mlp, dims.hidden))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class AllInOne(nn.Module):
    def __init__(self, dims: Dims, vocab_size: int, image_size: int, num_frames: int,
                 max_text_tokens: int, temporal_roll: bool = True):
        super().__init__()
        # False: the paper's "w/o temporal token rolling" ablation (frames meet only in the mean).
        self.rolling = temporal_roll
        if image_size % dims.patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {dims.patch}")
        self.dims, self.num_frames = dims, num_frames
        self.num_patches = (image_size // dims.patch) ** 2
        h = dims.hidden
        self.patch_embed = nn.Conv2d(3, h, kernel_size=dims.patch, stride=dims.patch)
        self.visual_cls = nn.Parameter(torch.zeros(1, 1, h))
        self.spatial_pos = nn.Parameter(torch.zeros(1, 1 + self.num_patches, h))
        self.temporal_pos = nn.Parameter(torch.zeros(1, num_frames, 1, h))
        self.word_embed = nn.Embedding(vocab_size, h)
        self.text_pos = nn.Parameter(torch.zeros(1, max_text_tokens, h))
        self.token_type = nn.Embedding(2, h)  # 0 text, 1 visual
        self.blocks = nn.ModuleList(Block(dims) for _ in range(dims.layers))
        self.norm = nn.LayerNorm(h, eps=1e-6)
        # BERT / ViT initialisation: with PyTorch's default N(0, 1) embeddings the tied MLM
        # decoder starts with logits in the tens and a loss near 28 instead of log(vocab) ~ 10.
        for p in (self.visual_cls, self.spatial_pos, self.temporal_pos, self.text_pos,
                  self.word_embed.weight, self.token_type.weight):
            nn.init.trunc_normal_(p, std=0.02)

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return list(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.dims.hidden

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``[B, Lt, H]``: word + position + type 0."""
        lt = text_ids.shape[1]
        return self.word_embed(text_ids) + self.text_pos[:, :lt] + self.token_type.weight[0]

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames [B, T, 3, S, S]`` (normalised) -> ``[B, T, 1 + P, H]``."""
        b, t = frames.shape[:2]
        if t > self.num_frames:
            raise ValueError(f"{t} frames exceed the model's num_frames={self.num_frames}")
        patches = self.patch_embed(frames.flatten(0, 1)).flatten(2).transpose(1, 2)   # [B*T, P, H]
        cls = self.visual_cls.expand(len(patches), -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.spatial_pos + self.token_type.weight[1]
        return tokens.view(b, t, 1 + self.num_patches, -1) + self.temporal_pos[:, :t]

    def forward(self, frames: torch.Tensor | None, text_ids: torch.Tensor | None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """States averaged over frames: ``[B, Lt + 1 + P, H]`` (text slots first) for a joint
        pass; ``[B, Lt, H]`` for text only (``frames=None``); ``[B, 1 + P, H]`` for video only."""
        if frames is None:
            x = self.embed_text(text_ids)
            for block in self.blocks:
                x = block(x, ~text_mask)
            return self.norm(x)
        visual = self.embed_frames(frames)
        b, t, lv, h = visual.shape
        lt = 0 if text_ids is None else text_ids.shape[1]
        padding = None
        if lt:
            text = self.embed_text(text_ids)
            x = torch.cat([text.unsqueeze(1).expand(b, t, lt, h), visual], dim=2).reshape(b * t, lt + lv, h)
            padding = torch.cat([~text_mask, torch.zeros(b, lv, dtype=torch.bool, device=text_mask.device)], 1)
            padding = padding.repeat_interleave(t, dim=0)
        else:
            x = visual.reshape(b * t, lv, h)
        for block in self.blocks:
            if lt and self.rolling:  # rolling only where both modalities meet (REFERENCE.md)
                x = x.view(b, t, lt + lv, h)
                x = torch.cat([x[:, :, :lt], temporal_roll(x[:, :, lt:])], dim=2).view(b * t, lt + lv, h)
            x = block(x, padding)
        return self.norm(x).view(b, t, lt + lv, h).mean(dim=1)


class AllInOneHeads(nn.Module):
    """The model and its heads: MLM (tied to the word embeddings), VTM on the text [CLS] of a
    joint pass, retrieval projections for the fast separate passes, and a QA classifier. E-ViLM's
    backbone has the same layout and wears the same heads."""

    def __init__(self, backbone: AllInOne, num_answers: int = 0, embed_dim: int = 256):
        super().__init__()
        h, e = backbone.hidden_size, backbone.word_embed.embedding_dim  # E-ViLM: words narrower than h
        self.backbone = backbone
        self.mlm_transform = nn.Sequential(nn.Linear(h, e), nn.GELU(), nn.LayerNorm(e, eps=1e-12))
        self.mlm_bias = nn.Parameter(torch.zeros(backbone.word_embed.num_embeddings))
        self.vtm = nn.Linear(h, 2)
        self.text_proj, self.video_proj = nn.Linear(h, embed_dim), nn.Linear(h, embed_dim)
        self.qa = (nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h), nn.Linear(2 * h, num_answers))
                   if num_answers else None)

    def forward(self, frames: torch.Tensor | None, text_ids: torch.Tensor | None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's pass (joint, text only or video only); the heads read its states."""
        return self.backbone(frames, text_ids, text_mask)

    def mlm_logits(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.mlm_transform(text_states) @ self.backbone.word_embed.weight.T + self.mlm_bias

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` unit vectors from a text-only pass (its [CLS] state)."""
        return F.normalize(self.text_proj(self.backbone(None, text_ids, text_mask)[:, 0]), dim=-1)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` unit vectors from a video-only pass (the visual [CLS], averaged over frames)."""
        return F.normalize(self.video_proj(self.backbone(frames, None)[:, 0]), dim=-1)


def flavour_of(flavours: dict, name: str):
    """``flavours[name]``; ConfigError naming ``model.flavour`` when this model has no such size."""
    if name not in flavours:
        raise ConfigError("model.flavour", f"unknown flavour {name!r}; choose one of {sorted(flavours)}")
    return flavours[name]


def build(cfg, vocab_size: int, num_answers: int = 0) -> AllInOneHeads:
    """All-in-one of ``cfg`` (a FramesModelConfig) with its heads; ``num_answers`` > 0 adds the QA
    classifier (vidray.archs.FRAMES_ARCHS["allinone"])."""
    backbone = AllInOne(flavour_of(ALLINONE_FLAVOURS, cfg.flavour), vocab_size, cfg.image_size, cfg.num_frames,
                        cfg.max_text_tokens, temporal_roll=cfg.temporal_roll)
    return AllInOneHeads(backbone, num_answers, cfg.embed_dim)
