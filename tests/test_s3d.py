"""S3D-G: output shapes, the checkpoint's key layout, the weights loader (local and s3://),
space-to-depth, SAME pooling, self-gating against naive references, preprocess, eval behaviour."""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pytest
import torch

from vidray import config, storage
from vidray.models.s3d import (
    INCEPTION_CHANNELS,
    MaxPool3dSame,
    S3DConfig,
    S3DWeightsError,
    SelfGating,
    build_s3d,
    load_s3d_weights,
    preprocess,
    space_to_depth,
)
from vidray.models.weights import file_digest as weights_digest

TOP_LEVEL = ["conv1", "maxpool_2a", "conv_2b", "conv_2c", "gating", "maxpool_3a", "mixed_3b",
             "mixed_3c", "maxpool_4a", "mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f",
             "maxpool_5a", "mixed_5b", "mixed_5c", "fc"]
BRANCHES = ["conv_b0", "conv_b1_a", "conv_b1_b", "conv_b2_a", "conv_b2_b", "maxpool_b3", "conv_b3_b",
            "gating_b0", "gating_b1", "gating_b2", "gating_b3"]
TEXT_KEYS = ["text_module.word_embd.weight", "text_module.fc1.weight", "text_module.fc1.bias",
             "text_module.fc2.weight", "text_module.fc2.bias"]


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_s3d("full").eval()


def _randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random parameters *and* BatchNorm statistics, so a loaded copy cannot match by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values + 0.5 if name.endswith("running_var") else values - 0.5)
    return model.eval()


def _checkpoint(model: torch.nn.Module, *, text: bool = True, prefix: str = "", wrapper: str | None = None) -> dict:
    state = dict(model.state_dict())
    if text:
        state.update({key: torch.randn(4, 3) for key in TEXT_KEYS})
    state = {prefix + key: value for key, value in state.items()}
    return {wrapper: state, "epoch": 7} if wrapper else state


def _save(path, payload) -> str:
    torch.save(payload, path)
    return str(path)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- shapes and layout


def test_full_forward_shapes(full_model):
    with torch.no_grad():
        out = full_model(torch.rand(1, 3, 16, 112, 112))
    assert set(out) == {"video_embedding", "mixed_5c"}
    assert out["video_embedding"].shape == (1, 512) and out["mixed_5c"].shape == (1, 1024)
    for value in out.values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()


@pytest.mark.parametrize("shape", [(2, 3, 16, 112, 112), (1, 3, 30, 64, 64)])  # 30: odd sizes inside
def test_tiny_forward_shapes(shape):
    model = build_s3d("tiny").eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out["video_embedding"].shape == (shape[0], 512)
    assert out["mixed_5c"].shape == (shape[0], 1024 // 8) == (shape[0], model.mixed_5c_dim)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


def test_full_key_layout_matches_the_checkpoint(full_model):
    assert [name for name, _ in full_model.named_children()] == TOP_LEVEL
    state = full_model.state_dict()
    keys = list(state)
    first_seen = list(dict.fromkeys(key.split(".")[0] for key in keys))
    assert first_seen == [name for name in TOP_LEVEL if not name.startswith("maxpool")]
    assert not any(key.startswith("text_module") for key in keys)
    for block in INCEPTION_CHANNELS:
        assert [name for name, _ in getattr(full_model, block).named_children()] == BRANCHES
        assert f"{block}.conv_b1_b.conv2.weight" in state and f"{block}.gating_b3.fc.bias" in state
    assert state["conv1.conv1.weight"].shape == (64, 24, 2, 4, 4)
    assert "conv1.bn1.running_mean" in state and "conv1.conv2.weight" not in state
    assert state["conv_2c.conv1.weight"].shape == (192, 64, 1, 3, 3)  # separable: space ...
    assert state["conv_2c.conv2.weight"].shape == (192, 192, 3, 1, 1)  # ... then time
    assert state["gating.fc.weight"].shape == (192, 192)
    assert state["mixed_5c.conv_b2_b.bn2.weight"].shape == (128,)
    assert state["fc.weight"].shape == (512, 1024)
    assert not any(key.endswith(("conv1.bias", "conv2.bias")) for key in keys)  # convs have no bias
    assert full_model.conv1.bn1.eps == 1e-5


def test_inception_channels_chain_and_tiny_keeps_the_names(full_model):
    names = list(INCEPTION_CHANNELS)
    for before, after in zip(names, names[1:]):
        _, b0, _, b1b, _, b2b, b3b = INCEPTION_CHANNELS[before]
        assert INCEPTION_CHANNELS[after][0] == b0 + b1b + b2b + b3b
    tiny = build_s3d("tiny").state_dict()
    full = full_model.state_dict()
    assert list(tiny) == list(full)
    assert tiny["fc.weight"].shape == (512, 128) and tiny["conv1.conv1.weight"].shape == (8, 24, 2, 4, 4)


def test_config_validation_names_the_key():
    with pytest.raises(config.ConfigError, match="width_divisor"):
        config.from_dict(S3DConfig, {"width_divisor": 3})
    with pytest.raises(ValueError, match="tiny"):
        build_s3d("huge")
    assert S3DConfig(width_divisor=4).build().mixed_5c_dim == 256


def test_bad_inputs_get_one_clear_message():
    model = build_s3d("tiny")
    with pytest.raises(ValueError, match="even"):
        model(torch.rand(1, 3, 15, 32, 32))
    with pytest.raises(ValueError, match="preprocess"):
        model(torch.zeros(1, 3, 16, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------- building blocks


def test_space_to_depth_puts_each_2x2x2_block_into_channels():
    c, t, h, w = 3, 4, 4, 6
    video = torch.arange(2 * c * t * h * w, dtype=torch.float32).reshape(2, c, t, h, w)
    out = space_to_depth(video)
    assert out.shape == (2, 24, 2, 2, 3)
    # Channels 0..2 are the RGB of the block's first voxel; then dw, dh, dt in that order.
    assert torch.equal(out[:, 0:3, 0, 0, 0], video[:, :, 0, 0, 0])
    assert torch.equal(out[:, 3:6, 0, 0, 0], video[:, :, 0, 0, 1])
    assert torch.equal(out[:, 6:9, 0, 0, 0], video[:, :, 0, 1, 0])
    assert torch.equal(out[:, 12:15, 0, 0, 0], video[:, :, 1, 0, 0])
    for dt in range(2):
        for dh in range(2):
            for dw in range(2):
                for ch in range(c):
                    channel = ((dt * 2 + dh) * 2 + dw) * c + ch
                    assert torch.equal(out[:, channel], video[:, ch, dt::2, dh::2, dw::2])
    with pytest.raises(ValueError, match="even"):
        space_to_depth(torch.zeros(1, 3, 4, 5, 4))


def _naive_pool_1d(values: list[float], kernel: int, stride: int) -> list[float]:
    """The port's SAME pooling along one axis: pad max(k - s, 0) zeros, the smaller half first."""
    total = max(kernel - stride, 0)
    padded = [0.0] * (total // 2) + values + [0.0] * (total - total // 2)
    out_len = math.ceil(len(values) / stride)
    return [max(padded[i * stride:i * stride + kernel]) for i in range(out_len)]


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (1, 2)])
@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 15])
def test_same_max_pool_against_naive(kernel, stride, n):
    pool = MaxPool3dSame((kernel, 1, 1), (stride, 1, 1))
    values = torch.rand(n).tolist()
    out = pool(torch.tensor(values).reshape(1, 1, n, 1, 1))
    assert out.shape[2] == math.ceil(n / stride)
    assert out.flatten().tolist() == pytest.approx(_naive_pool_1d(values, kernel, stride))
    assert MaxPool3dSame((3, 3, 3), (2, 2, 2))(torch.rand(1, 2, 15, 14, 7)).shape == (1, 2, 8, 7, 4)


def test_self_gating_against_naive():
    torch.manual_seed(0)
    gating = SelfGating(4)
    x = torch.rand(2, 4, 3, 2, 5)
    mean = x.reshape(2, 4, -1).mean(-1)
    weights = 1 / (1 + torch.exp(-(mean @ gating.fc.weight.T + gating.fc.bias)))
    torch.testing.assert_close(gating(x), x * weights.reshape(2, 4, 1, 1, 1))


def test_preprocess_layout_and_scale():
    frames = np.zeros((30, 8, 6, 3), dtype=np.uint8)
    frames[4, 2, 1] = (255, 51, 0)
    out = preprocess(frames)
    assert out.shape == (1, 3, 30, 8, 6) and out.dtype == torch.float32 and out.is_contiguous()
    assert out[0, :, 4, 2, 1].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert out.sum().item() == pytest.approx(1.2)
    batch = torch.from_numpy(np.stack([frames, frames]))
    assert preprocess(batch).shape == (2, 3, 30, 8, 6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(frames.astype(np.float32))


# ----------------------------------------------------------------------------- eval behaviour


def test_eval_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = _randomized(build_s3d("tiny"))
    video = torch.rand(3, 3, 8, 32, 32)
    with torch.no_grad():
        first, second = model(video), model(video)
        assert all(torch.equal(first[k], second[k]) for k in first)
        for i in range(3):
            single = model(video[i:i + 1])
            for key in first:
                torch.testing.assert_close(single[key][0], first[key][i], rtol=1e-4, atol=1e-5)


def test_train_mode_backward_reaches_every_parameter():
    model = build_s3d("tiny").train()
    model(torch.rand(2, 3, 8, 32, 32))["video_embedding"].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- loader


@pytest.mark.parametrize("wrapper,prefix", [(None, ""), ("state_dict", "module."), ("model", "")])
def test_round_trip(tmp_path, wrapper, prefix):
    source = _randomized(build_s3d("tiny"))
    uri = _save(tmp_path / "s3d.pth", _checkpoint(source, prefix=prefix, wrapper=wrapper))
    target = build_s3d("tiny").eval()
    assert not _same_weights(source, target)
    report = load_s3d_weights(target, uri)
    assert report.complete and report.uri == uri
    assert sorted(report.set_aside) == sorted(TEXT_KEYS)
    assert len(report.loaded) == len(target.state_dict())
    assert report.digest == weights_digest(uri) == hashlib.sha256((tmp_path / "s3d.pth").read_bytes()).hexdigest()
    assert _same_weights(source, target)
    video = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(video)["video_embedding"], target(video)["video_embedding"])


def _refused(model, uri) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(S3DWeightsError) as err:
        load_s3d_weights(model, uri)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    message = str(err.value)
    assert uri in message and "allow_partial=True" in message
    return message


def test_missing_key_is_refused_then_accepted_with_allow_partial(tmp_path):
    source = _randomized(build_s3d("tiny"))
    state = _checkpoint(source)
    del state["mixed_4d.conv_b0.bn1.running_var"]
    uri = _save(tmp_path / "missing.pth", state)
    target = build_s3d("tiny")
    assert "mixed_4d.conv_b0.bn1.running_var" in _refused(target, uri)
    report = load_s3d_weights(target, uri, allow_partial=True)
    assert report.missing == ["mixed_4d.conv_b0.bn1.running_var"] and not report.complete
    assert not report.unexpected and not report.mismatched
    assert torch.equal(target.fc.weight, source.fc.weight)
    assert torch.equal(target.mixed_4d.conv_b0.bn1.running_var, torch.ones(128 // 8))  # kept its init


def test_unexpected_key_is_refused_then_reported(tmp_path):
    state = _checkpoint(build_s3d("tiny"))
    state["mixed_9z.fc.weight"] = torch.zeros(3)
    uri = _save(tmp_path / "extra.pth", state)
    target = build_s3d("tiny")
    assert "mixed_9z.fc.weight" in _refused(target, uri)
    report = load_s3d_weights(target, uri, allow_partial=True)
    assert report.unexpected == ["mixed_9z.fc.weight"] and len(report.set_aside) == len(TEXT_KEYS)


def test_wrong_shape_is_refused_then_reported(tmp_path):
    source = _randomized(build_s3d("tiny"))
    state = _checkpoint(source)
    state["fc.weight"] = torch.zeros(256, 128)
    uri = _save(tmp_path / "shape.pth", state)
    target = build_s3d("tiny")
    message = _refused(target, uri)
    assert "fc.weight (checkpoint [256, 128], model [512, 128])" in message
    before = target.fc.weight.clone()
    report = load_s3d_weights(target, uri, allow_partial=True)
    assert report.mismatched == [("fc.weight", (256, 128), (512, 128))]
    assert torch.equal(target.fc.weight, before) and torch.equal(target.fc.bias, source.fc.bias)


def test_tiny_weights_do_not_fit_the_full_model(tmp_path, full_model):
    uri = _save(tmp_path / "tiny.pth", _checkpoint(build_s3d("tiny")))
    message = _refused(full_model, uri)
    assert "with the wrong shape" in message and "more)" in message  # the listing is capped


def test_checkpoint_without_batchnorm_counters_loads(tmp_path):
    source = _randomized(build_s3d("tiny"))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    report = load_s3d_weights(build_s3d("tiny"), _save(tmp_path / "old.pth", state))
    assert report.complete and not report.set_aside


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(S3DWeightsError, match="notes.pth: cannot read it as a PyTorch weights file"):
        load_s3d_weights(build_s3d("tiny"), str(path))
    with pytest.raises(S3DWeightsError, match="not a state dict"):
        load_s3d_weights(build_s3d("tiny"), _save(tmp_path / "list.pth", [1, 2]))
    with pytest.raises(storage.StorageError, match="absent.pth"):
        load_s3d_weights(build_s3d("tiny"), str(tmp_path / "absent.pth"))


def test_load_from_s3(s3_uri):
    source = _randomized(build_s3d("tiny"))
    buffer = io.BytesIO()
    torch.save(_checkpoint(source, prefix="module.", wrapper="state_dict"), buffer)
    uri = f"{s3_uri}/weights/s3d_howto100m.pth"
    storage.write_bytes(uri, buffer.getvalue())
    target = build_s3d("tiny")
    report = load_s3d_weights(target, uri)
    assert report.complete and _same_weights(source, target)
    assert report.digest == weights_digest(uri) == hashlib.sha256(buffer.getvalue()).hexdigest()
