"""S3D-G, the video encoder of the VLM feature path, and a loader for ``s3d_howto100m.pth``.

    model = build_s3d("full").eval()
    report = load_s3d_weights(model, "s3://models/s3d_howto100m.pth")   # refuses a wrong file
    with torch.no_grad():
        out = model(preprocess(window))   # window: uint8 [30, 224, 224, 3] from video.iter_windows
    out["video_embedding"]                # [1, 512]: the per-second VLM video token
    out["mixed_5c"]                       # [1, 1024]: pooled backbone feature before the fc

The network is S3D-G as trained with MIL-NCE on HowTo100M (Miech et al., 2020), with the module
names of the public checkpoint, so that file loads without renaming. Its ``text_module.*``
(a word2vec sentence branch) is not modelled here: the loader sets those keys aside.

Two details follow the public PyTorch port that the checkpoint ships with (and that produced the
reference VLM features) rather than the TensorFlow original:

- BatchNorm eps is 1e-5 (PyTorch's default, as in the port); TF trained with 1e-3. Kept
  configurable as ``S3DConfig.bn_eps``.
- "SAME" max pooling pads ``max(k - s, 0)`` with the smaller half first and uses ceil mode. Output
  sizes are ``ceil(n / s)`` as in TF, and for even ``n`` the windows are TF's too; for odd ``n``
  TF would pad one on each side where the port pads one after. This matters in practice: a
  30-frame window reaches ``maxpool_4a`` with 15 time steps.

``S3D_FLAVOURS`` holds ``full`` (the published widths) and ``tiny`` (every channel count / 8,
same module names, same 512-d ``video_embedding``) for CPU tests and demos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidray.config import ConfigError, option
from vidray.models.weights import key_listing, missing_keys, read_weights

# (in, b0, b1a, b1b, b2a, b2b, b3b) channels of each inception block of the published S3D-G;
# a block's output is b0 + b1b + b2b + b3b channels, the next block's input.
INCEPTION_CHANNELS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "mixed_3b": (192, 64, 96, 128, 16, 32, 32),
    "mixed_3c": (256, 128, 128, 192, 32, 96, 64),
    "mixed_4b": (480, 192, 96, 208, 16, 48, 64),
    "mixed_4c": (512, 160, 112, 224, 24, 64, 64),
    "mixed_4d": (512, 128, 128, 256, 24, 64, 64),
    "mixed_4e": (512, 112, 144, 288, 32, 64, 64),
    "mixed_4f": (528, 256, 160, 320, 32, 128, 128),
    "mixed_5b": (832, 256, 160, 320, 32, 128, 128),
    "mixed_5c": (832, 384, 192, 384, 48, 128, 128),
}
# Every published channel count is a multiple of 8, so these divisors keep the layout intact.
WIDTH_DIVISORS = (1, 2, 4, 8)
# The checkpoint's word2vec text branch: known, not modelled, set aside by the loader.
TEXT_MODULE_PREFIX = "text_module."


@dataclasses.dataclass(frozen=True)
class S3DConfig:
    """S3D-G hyper-parameters; the defaults are the published model that the checkpoint fits."""

    width_divisor: int = option(
        1, "divide every channel count by this (1, 2, 4 or 8): 1 = the published S3D-G that "
           "s3d_howto100m.pth fits; 8 = 'tiny' (same module names) for CPU tests", ge=1)
    embed_dim: int = option(
        512, "width of `video_embedding`, the final fc's output (512 in the checkpoint; kept at "
             "512 in 'tiny' so downstream code sees the same feature width)", ge=1)
    bn_eps: float = option(
        1e-5, "BatchNorm epsilon: 1e-5 as in the PyTorch port the checkpoint ships with and that "
              "produced the reference features (TF trained with 1e-3)", gt=0.0)

    def validate(self) -> None:
        if self.width_divisor not in WIDTH_DIVISORS:
            raise ConfigError("width_divisor", f"must be one of {WIDTH_DIVISORS} (it must divide "
                                               f"every S3D-G channel count), got {self.width_divisor}")

    def build(self) -> "S3DG":
        return S3DG(self)


S3D_FLAVOURS: dict[str, S3DConfig] = {
    "full": S3DConfig(),
    "tiny": S3DConfig(width_divisor=8),
}


def build_s3d(flavour: str = "full") -> "S3DG":
    """A randomly initialised S3D-G of a named flavour (see ``S3D_FLAVOURS``)."""
    if flavour not in S3D_FLAVOURS:
        raise ValueError(f"unknown S3D flavour {flavour!r}; choose one of {sorted(S3D_FLAVOURS)}")
    return S3D_FLAVOURS[flavour].build()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, seed: int = 0, frames: int = 32, size: int = 112,
                        clips: int = 8) -> None:
    """Give a randomly initialised network BatchNorm statistics, from seeded smooth noise.

    Why: fresh BatchNorm layers hold mean 0 / variance 1, so in eval mode they normalise
    nothing; through S3D-G's depth the ReLU activations then shrink towards a constant and every
    video gets the *same* embedding (measured: zero spread across videos). Statistics gathered
    on low-frequency noise (random 4 x 8 x 8 volumes upsampled, like natural video) keep every
    layer near unit scale, so random-init features differ between videos — useful for tests
    and demos that need no downloaded weights. Deterministic for a seed; never used when real
    weights are loaded (they carry their own statistics).
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(clips, 3, 4, 8, 8, generator=generator)
    noise = F.interpolate(coarse, size=(frames, size, size), mode="trilinear", align_corners=False)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in batchnorms]
    for m in batchnorms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass gives the batch's own statistics
        m.train()
    model(noise)
    for m, (momentum, training) in zip(batchnorms, saved):
        m.momentum = momentum
        m.train(training)


# ----------------------------------------------------------------------------- building blocks


def space_to_depth(video: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, 8C, T/2, H/2, W/2]``: each 2x2x2 block goes into channels.

    Output channel ``((dt * 2 + dh) * 2 + dw) * C + c`` holds input ``(c, 2t + dt, 2h + dh,
    2w + dw)``: the order the checkpoint's stem was trained with (the TPU trick of the original).
    """
    b, c, t, h, w = video.shape
    if t % 2 or h % 2 or w % 2:
        raise ValueError(f"space_to_depth needs even T, H, W; got T={t}, H={h}, W={w}")
    blocks = video.reshape(b, c, t // 2, 2, h // 2, 2, w // 2, 2)
    blocks = blocks.permute(0, 3, 5, 7, 1, 2, 4, 6)  # b, dt, dh, dw, c, t, h, w
    return blocks.reshape(b, 8 * c, t // 2, h // 2, w // 2)


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


class STConv3D(nn.Module):
    """Conv3d (no bias) + BatchNorm + ReLU; separable: 1 x k x k in space, then k x 1 x 1 in time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 *, padding: int | tuple[int, int, int] = 0, separable: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        pt, ph, pw = _triple(padding)
        self.separable = separable
        if separable:
            self.conv1 = nn.Conv3d(in_channels, out_channels, (1, kh, kw), padding=(0, ph, pw), bias=False)
            self.bn1 = nn.BatchNorm3d(out_channels, eps=eps)
            self.conv2 = nn.Conv3d(out_channels, out_channels, (kt, 1, 1), padding=(pt, 0, 0), bias=False)
            self.bn2 = nn.BatchNorm3d(out_channels, eps=eps)
        else:
            self.conv1 = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), padding=(pt, ph, pw), bias=False)
            self.bn1 = nn.BatchNorm3d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.separable:
            x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return x


class SelfGating(nn.Module):
    """S3D-G's feature gating: ``x * sigmoid(fc(mean of x over T, H, W))`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))
        return x * weights[:, :, None, None, None]


class MaxPool3dSame(nn.Module):
    """Max pooling with "SAME"-style padding as in the checkpoint's port (see the module docstring).

    Pads ``max(k - s, 0)`` per dimension (the smaller half before) and pools in ceil mode, so the
    output is ``ceil(n / s)``. Zero padding equals -inf padding here: every input is post-ReLU.
    """

    def __init__(self, kernel_size: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        pads: list[int] = []
        for k, s in reversed(list(zip(self.kernel_size, self.stride))):  # F.pad wants W first
            total = max(k - s, 0)
            pads += [total // 2, total - total // 2]
        self.padding = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(F.pad(x, self.padding), self.kernel_size, self.stride, ceil_mode=True)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class InceptionBlock(nn.Module):
    """Four branches (1x1x1; 1x1x1 -> sep 3x3x3; 1x1x1 -> sep 3x3x3; pool -> 1x1x1), each gated."""

    def __init__(self, in_channels: int, b0: int, b1a: int, b1b: int, b2a: int, b2b: int, b3b: int,
                 *, eps: float = 1e-5):
        super().__init__()
        self.conv_b0 = STConv3D(in_channels, b0, 1, eps=eps)
        self.conv_b1_a = STConv3D(in_channels, b1a, 1, eps=eps)
        self.conv_b1_b = STConv3D(b1a, b1b, 3, padding=1, separable=True, eps=eps)
        self.conv_b2_a = STConv3D(in_channels, b2a, 1, eps=eps)
        self.conv_b2_b = STConv3D(b2a, b2b, 3, padding=1, separable=True, eps=eps)
        self.maxpool_b3 = nn.MaxPool3d(3, stride=1, padding=1)
        self.conv_b3_b = STConv3D(in_channels, b3b, 1, eps=eps)
        self.gating_b0 = SelfGating(b0)
        self.gating_b1 = SelfGating(b1b)
        self.gating_b2 = SelfGating(b2b)
        self.gating_b3 = SelfGating(b3b)
        self.out_channels = b0 + b1b + b2b + b3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.gating_b0(self.conv_b0(x))
        b1 = self.gating_b1(self.conv_b1_b(self.conv_b1_a(x)))
        b2 = self.gating_b2(self.conv_b2_b(self.conv_b2_a(x)))
        b3 = self.gating_b3(self.conv_b3_b(self.maxpool_b3(x)))
        return torch.cat((b0, b1, b2, b3), dim=1)


# ----------------------------------------------------------------------------- the network


class S3DG(nn.Module):
    """S3D-G video encoder: ``[B, 3, T, H, W]`` in [0, 1] (T, H, W even) -> embeddings.

    ``forward`` returns ``{"video_embedding": [B, embed_dim], "mixed_5c": [B, 1024 / divisor]}``.
    Fully convolutional with global average pooling, so any even T, H, W works; the checkpoint
    was trained on 32 x 224 x 224 and the reference features use 30-frame windows.
    """

    def __init__(self, config: S3DConfig | None = None):
        super().__init__()
        self.config = config = config or S3DConfig()
        config.validate()
        eps, d = config.bn_eps, config.width_divisor

        def inception(name: str) -> InceptionBlock:
            return InceptionBlock(*(c // d for c in INCEPTION_CHANNELS[name]), eps=eps)

        # Registration order = the documented layer order (and the checkpoint's key order).
        self.conv1 = STConv3D(24, 64 // d, (2, 4, 4), padding=(1, 2, 2), eps=eps)
        self.maxpool_2a = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.conv_2b = STConv3D(64 // d, 64 // d, 1, eps=eps)
        self.conv_2c = STConv3D(64 // d, 192 // d, 3, padding=1, separable=True, eps=eps)
        self.gating = SelfGating(192 // d)
        self.maxpool_3a = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.mixed_3b = inception("mixed_3b")
        self.mixed_3c = inception("mixed_3c")
        self.maxpool_4a = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.mixed_4b = inception("mixed_4b")
        self.mixed_4c = inception("mixed_4c")
        self.mixed_4d = inception("mixed_4d")
        self.mixed_4e = inception("mixed_4e")
        self.mixed_4f = inception("mixed_4f")
        self.maxpool_5a = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.mixed_5b = inception("mixed_5b")
        self.mixed_5c = inception("mixed_5c")
        self.mixed_5c_dim = self.mixed_5c.out_channels
        self.fc = nn.Linear(self.mixed_5c_dim, config.embed_dim)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_video(video)
        x = self.conv1(space_to_depth(video))
        # The (2, 4, 4) stem with padding (1, 2, 2) gives one extra step per dimension; dropping
        # the first reproduces TF's asymmetric "SAME" padding the weights were trained with.
        x = x[:, :, 1:, 1:, 1:]
        x = self.gating(self.conv_2c(self.conv_2b(self.maxpool_2a(x))))
        x = self.mixed_3c(self.mixed_3b(self.maxpool_3a(x)))
        x = self.maxpool_4a(x)
        for block in (self.mixed_4b, self.mixed_4c, self.mixed_4d, self.mixed_4e, self.mixed_4f):
            x = block(x)
        x = self.mixed_5c(self.mixed_5b(self.maxpool_5a(x)))
        pooled = x.mean(dim=(2, 3, 4))
        return {"video_embedding": self.fc(pooled), "mixed_5c": pooled}


def _check_video(video: torch.Tensor) -> None:
    if video.dim() != 5 or video.shape[1] != 3 or not video.is_floating_point():
        raise ValueError("S3DG expects a float video [B, 3, T, H, W] with values in [0, 1] (see "
                         f"vidray.models.s3d.preprocess); got {video.dtype} {tuple(video.shape)}")
    if any(n % 2 for n in video.shape[2:]):
        raise ValueError(f"S3DG needs even T, H and W (space-to-depth); got {tuple(video.shape[2:])}")


def preprocess(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` or ``[B, T, H, W, 3]`` -> float32 ``[B, 3, T, H, W]`` in [0, 1].

    Divides by 255 only (no mean/std), as the reference extraction does. ``device``: the uint8
    frames move there before the conversion (a quarter of the bytes of float32).
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.dim() not in (4, 5) or frames.shape[-1] != 3:
        raise ValueError("preprocess expects uint8 RGB frames [T, H, W, 3] or [B, T, H, W, 3]; got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    if device is not None:
        frames = frames.to(device, non_blocking=True)
    # Reorder as uint8 (a quarter of the bytes), then convert once into a contiguous float tensor.
    video = frames.permute(0, 4, 1, 2, 3).contiguous().to(torch.float32)
    return video.div_(255.0)


# ----------------------------------------------------------------------------- checkpoint loading


class S3DWeightsError(ValueError):
    """A checkpoint does not fit the model (or is not a checkpoint); the message names the URI."""


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_s3d_weights` did with each checkpoint key."""

    uri: str
    digest: str  # sha256 of the file's bytes, as vidray.models.weights.file_digest(uri) returns
    loaded: list[str]  # keys copied into the model
    missing: list[str]  # model keys the checkpoint lacks (they keep their current values)
    unexpected: list[str]  # checkpoint keys the model does not have (text_module.* excluded)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, checkpoint, model shape)
    set_aside: list[str]  # text_module.*: the checkpoint's text branch, not modelled

    @property
    def complete(self) -> bool:
        """Every model tensor came from the checkpoint and nothing else was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (f"{self.uri}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches, "
                f"{len(self.set_aside)} text_module tensors set aside")


def load_s3d_weights(model: S3DG, uri: str, *, allow_partial: bool = False) -> LoadReport:
    """Load an ``s3d_howto100m.pth``-style checkpoint from any URI into ``model``.

    Accepts a raw state dict, one nested under ``"state_dict"`` or ``"model"``, and a
    ``module.`` prefix (DataParallel). ``text_module.*`` keys are set aside, not errors. Anything
    missing, unexpected or of the wrong shape raises :class:`S3DWeightsError` before the model is
    touched, unless ``allow_partial=True``: then the matching tensors are loaded and the report
    says what was not. BatchNorm ``num_batches_tracked`` counters may be absent (older files
    lack them; evaluation does not use them).
    """
    state, digest = read_weights(uri, S3DWeightsError, "Is it s3d_howto100m.pth?")
    report = _match(model.state_dict(), state, uri, digest)
    if not report.complete and not allow_partial:
        raise S3DWeightsError(_refusal(report))
    model.load_state_dict({key: state[key] for key in report.loaded}, strict=False)
    return report


def _match(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any], uri: str, digest: str) -> LoadReport:
    report = LoadReport(uri=uri, digest=digest, loaded=[], missing=[], unexpected=[], mismatched=[],
                        set_aside=[])
    for key, value in state.items():
        if key.startswith(TEXT_MODULE_PREFIX):
            report.set_aside.append(key)
        elif key not in expected or not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
        elif value.shape != expected[key].shape:
            report.mismatched.append((key, tuple(value.shape), tuple(expected[key].shape)))
        else:
            report.loaded.append(key)
    report.missing = missing_keys(expected, state)
    return report


def _refusal(report: LoadReport, limit: int = 10) -> str:
    parts = []
    if report.missing:
        parts.append(key_listing("missing", report.missing, limit))
    if report.unexpected:
        parts.append(key_listing("unexpected", report.unexpected, limit))
    if report.mismatched:
        parts.append(key_listing("with the wrong shape", [f"{key} (checkpoint {list(ckpt)}, model {list(own)})"
                                                          for key, ckpt, own in report.mismatched], limit))
    return (f"{report.uri}: does not fit this S3D-G ({len(report.loaded)} tensors match); "
            + "; ".join(parts) + ". Is it the right file (s3d_howto100m.pth), and the 'full' "
            "flavour (the tiny one cannot take the published weights)? Pass allow_partial=True "
            "to load only the matching tensors.")
