"""The smallest frames model, and how to add a model to vidray: this file plus one line in
:data:`vidray.archs.FRAMES_ARCHS` (``"example": FramesArch("vidray.models.example:build")``).

    vidray pretrain configs/demo/allinone_pretrain.yaml model.arch=example data.frames=URI ...

Each frame is the mean of its 16-px patch embeddings, the clip one more token (the mean over its
frames); the text is word + position embeddings; a few transformer layers fuse both. No temporal
modelling and no patch-level attention: a baseline, not a paper's model. It follows All-in-one's
recipe (``FramesArch.recipe``), so it wears :class:`vidray.models.allinone.AllInOneHeads` and
pre-trains with MLM + video-text matching, fine-tunes for retrieval (separate passes) or QA (a
classifier), and is scored as All-in-one is. That recipe asks this of the backbone:

- ``hidden_size`` and ``word_embed`` (an ``nn.Embedding``: the MLM head is tied to it);
- ``forward(frames, text_ids, text_mask)`` -> states ``[B, Lt + Lv, H]``, text slots first
  (slot 0, the text's [CLS], is what matching and QA read); ``forward(None, ids, mask)`` -> the
  text's ``[B, Lt, H]``; ``forward(frames, None)`` -> ``[B, Lv, H]`` whose slot 0 is the clip's
  pooled state (retrieval's video side). ``frames`` are ``[B, T, 3, S, S]``, normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vidray.models.allinone import AllInOneHeads, flavour_of


@dataclass(frozen=True)
class ExampleDims:
    hidden: int
    layers: int
    heads: int
    patch: int = 16


EXAMPLE_FLAVOURS: dict[str, ExampleDims] = {
    "tiny": ExampleDims(hidden=64, layers=1, heads=2),
    "base": ExampleDims(hidden=512, layers=4, heads=8),
}


class MeanPoolFusion(nn.Module):
    def __init__(self, dims: ExampleDims, vocab_size: int, num_frames: int, max_text_tokens: int):
        super().__init__()
        h = dims.hidden
        self.word_embed = nn.Embedding(vocab_size, h)
        self.text_pos = nn.Parameter(torch.zeros(1, max_text_tokens, h))
        self.patch_embed = nn.Conv2d(3, h, dims.patch, dims.patch)
        self.frame_pos = nn.Parameter(torch.zeros(1, 1 + num_frames, h))  # the clip token, then each frame
        self.token_type = nn.Embedding(2, h)                                # 0 text, 1 video
        layer = nn.TransformerEncoderLayer(h, dims.heads, 4 * h, dropout=0.0, batch_first=True, norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, dims.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        # BERT's N(0, 0.02): PyTorch's N(0, 1) embeddings would start the tied MLM head far from log(vocab).
        for p in (self.word_embed.weight, self.text_pos, self.frame_pos, self.token_type.weight):
            nn.init.trunc_normal_(p, std=0.02)

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return list(self.fusion.layers)

    @property
    def hidden_size(self) -> int:
        return self.word_embed.embedding_dim

    def video_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> ``[B, 1 + T, H]``: the clip's mean, then each frame's."""
        b, t = frames.shape[:2]
        per_frame = self.patch_embed(frames.flatten(0, 1)).mean(dim=(2, 3)).view(b, t, -1)
        tokens = torch.cat([per_frame.mean(dim=1, keepdim=True), per_frame], dim=1)
        return tokens + self.frame_pos[:, :1 + t] + self.token_type.weight[1]

    def forward(self, frames: torch.Tensor | None, text_ids: torch.Tensor | None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        parts, keep = [], []
        if text_ids is not None:
            parts.append(self.word_embed(text_ids) + self.text_pos[:, :text_ids.shape[1]] + self.token_type.weight[0])
            keep.append(text_mask)
        if frames is not None:
            video = self.video_tokens(frames)
            parts.append(video)
            keep.append(torch.ones(video.shape[:2], dtype=torch.bool, device=video.device))
        x = self.fusion(torch.cat(parts, dim=1), src_key_padding_mask=~torch.cat(keep, dim=1))
        return self.norm(x)


def build(cfg, vocab_size: int, num_answers: int = 0) -> AllInOneHeads:
    """The example model of ``cfg`` (a FramesModelConfig) with All-in-one's heads; ``num_answers`` > 0
    adds the QA classifier."""
    backbone = MeanPoolFusion(flavour_of(EXAMPLE_FLAVOURS, cfg.flavour), vocab_size, cfg.num_frames,
                              cfg.max_text_tokens)
    return AllInOneHeads(backbone, num_answers, cfg.embed_dim)
