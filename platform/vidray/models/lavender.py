"""LAVENDER: a video encoder, a BERT fusion encoder and BERT's MLM head as the only head.

    model = Lavender(LAVENDER_FLAVOURS["tiny"], vocab_size=30522, image_size=64, ...)
    logits = model(frames, text_ids, text_mask)          # [B, Lt, V]: MLM logits of every text slot

Every task is masked language modelling (REFERENCE.md): pre-training masks 15% of the text
(always [MASK]); video-text matching appends a [MASK] whose target is the word "true" or "false";
retrieval scores a pair by p(true) / (p(true) + p(false)) at that slot; open-ended QA reads one
answer word at a [MASK] after "answer:". Text goes through BERT's embeddings only; the fusion
encoder (BERT) sees ``[video tokens] [text]``; per frame the video side gives a mean-pooled token
then its patch tokens, projected to the BERT width.

The video encoder is ViT-style, not the paper's Video Swin: 16-px patches of every frame with
spatial and per-frame temporal embeddings, then transformer blocks over all frames' tokens at once
(joint space-time attention). torchvision's Video Swin would be the maintained choice, but its
PyPI build does not load beside the CPU build of torch this project installs (its compiled ops
fail to register), so it is left out rather than half-supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vidray.models.allinone import Block, Dims, flavour_of


def bert_init(module: nn.Module) -> None:
    """BERT's initialisation (N(0, 0.02) weights, zero biases, unit LayerNorms), for modules built
    piece by piece from transformers' parts: PyTorch's defaults give a tied MLM head huge logits."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class LavenderDims:
    video: Dims             # the ViT-style video encoder
    hidden: int             # BERT fusion encoder
    layers: int
    heads: int
    intermediate: int


# tiny: for CPU tests and the demo. base: ViT-B/16-sized video encoder + BERT-base.
LAVENDER_FLAVOURS: dict[str, LavenderDims] = {
    "tiny": LavenderDims(video=Dims(hidden=64, layers=2, heads=2, mlp=128, patch=16),
                         hidden=64, layers=2, heads=2, intermediate=128),
    "base": LavenderDims(video=Dims(hidden=768, layers=12, heads=12, mlp=3072, patch=16),
                         hidden=768, layers=12, heads=12, intermediate=3072),
}


class VideoEncoder(nn.Module):
    """``frames [B, T, 3, S, S]`` -> ``[B, T, P, D]`` patch states after joint space-time attention."""

    def __init__(self, dims: Dims, image_size: int, num_frames: int):
        super().__init__()
        if image_size % dims.patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {dims.patch}")
        patches = (image_size // dims.patch) ** 2
        self.patch_embed = nn.Conv2d(3, dims.hidden, kernel_size=dims.patch, stride=dims.patch)
        self.spatial_pos = nn.Parameter(torch.zeros(1, 1, patches, dims.hidden))
        self.temporal_pos = nn.Parameter(torch.zeros(1, num_frames, 1, dims.hidden))
        self.blocks = nn.ModuleList(Block(dims) for _ in range(dims.layers))
        self.norm = nn.LayerNorm(dims.hidden, eps=1e-6)
        nn.init.trunc_normal_(self.spatial_pos, std=0.02)
        nn.init.trunc_normal_(self.temporal_pos, std=0.02)

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return list(self.blocks)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        x = self.patch_embed(frames.flatten(0, 1)).flatten(2).transpose(1, 2)        # [B*T, P, D]
        x = x.view(b, t, -1, x.shape[-1]) + self.spatial_pos + self.temporal_pos[:, :t]
        p = x.shape[2]
        x = x.flatten(1, 2)
        for block in self.blocks:
            x = block(x, None)
        return self.norm(x).view(b, t, p, -1)


class Lavender(nn.Module):
    def __init__(self, dims: LavenderDims, vocab_size: int, image_size: int, num_frames: int,
                 max_text_tokens: int):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertOnlyMLMHead

        self.dims = dims
        self.video = VideoEncoder(dims.video, image_size, num_frames)
        self.video_proj = nn.Linear(dims.video.hidden, dims.hidden)
        config = BertConfig(vocab_size=vocab_size, hidden_size=dims.hidden, num_hidden_layers=dims.layers,
                            num_attention_heads=dims.heads, intermediate_size=dims.intermediate,
                            max_position_embeddings=max(512, max_text_tokens))
        config._attn_implementation = "eager"
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.mlm = BertOnlyMLMHead(config)
        for module in (self.embeddings, self.encoder, self.mlm, self.video_proj):
            module.apply(bert_init)
        # Tied as in BERT: the decoder is the word embeddings plus one output bias (transformers
        # ties these when it builds a whole model; built piece by piece, we tie them here).
        self.mlm.predictions.decoder.weight = self.embeddings.word_embeddings.weight
        self.mlm.predictions.decoder.bias = self.mlm.predictions.bias

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return list(self.encoder.layer)

    @property
    def hidden_size(self) -> int:
        return self.dims.hidden

    def video_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames [B, T, 3, S, S]`` -> ``[B, T * (1 + P), H]``: per frame its mean token, then its
        patch tokens."""
        x = self.video_proj(self.video(frames))                                       # [B, T, P, H]
        return torch.cat([x.mean(dim=2, keepdim=True), x], dim=2).flatten(1, 2)

    def forward(self, frames: torch.Tensor | None, text_ids: torch.Tensor, text_mask: torch.Tensor,
                video: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """MLM logits ``[B, Lt, V]`` of the text slots, every slot seeing the video and the text;
        with ``slots`` (one text position per row) only those: ``[B, V]`` (the tasks read one
        [MASK], and the vocabulary projection of every other slot was most of a tiny model's
        FLOPs). ``video``: the clips' ``video_tokens`` computed once (all-pairs scoring fuses each
        clip with every text; ``frames`` is then None). ``positions``: the text's position ids
        ``[B, Lt]`` (default 0, 1, ..): the matching [MASK] sits at the text width, after the
        padding (:func:`vidray.objectives.lavender.append_mask_slot`)."""
        video = self.video_tokens(frames) if video is None else video
        text = self.embeddings(input_ids=text_ids, token_type_ids=torch.ones_like(text_ids), position_ids=positions)
        x = torch.cat([video, text], dim=1)
        keep = torch.cat([torch.ones(video.shape[:2], dtype=torch.bool, device=video.device), text_mask], 1)
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        hidden = self.encoder(x, attention_mask=bias[:, None, None, :])[0][:, video.shape[1]:]
        if slots is not None:
            hidden = hidden[torch.arange(len(slots), device=hidden.device), slots]
        return self.mlm(hidden)


def build(cfg, vocab_size: int, num_answers: int = 0) -> Lavender:
    """LAVENDER of ``cfg`` (a FramesModelConfig): the one MLM head serves every task, so
    ``num_answers`` is unused (vidray.archs.FRAMES_ARCHS["lavender"])."""
    # Room for the "answer: [MASK]" a task appends to the text.
    return Lavender(flavour_of(LAVENDER_FLAVOURS, cfg.flavour), vocab_size, cfg.image_size, cfg.num_frames,
                    cfg.max_text_tokens + 8)
