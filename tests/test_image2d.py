"""The `image2d` feature set (issue 19): ImageNet EfficientNet-Lite0 features per second, through
the real extraction job on the local S3 endpoint, equal to a direct forward of the same frames;
and VLM taking its video width from whichever per-second set it is given."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vidray import storage
from vidray.config import ConfigError
from vidray.config.train import PretrainConfig
from vidray.config.vlm import ModelConfig
from vidray.data.manifest import read_manifest
from vidray.data.synth import SynthConfig, synthesize
from vidray.data.video import iter_windows
from vidray.data.vlm import with_video_dim
from vidray.feature_store import store
from vidray.feature_store.extract import ExtractConfig, run_extract
from vidray.feature_store.extractors import Image2DExtractConfig
from vidray.models.efficientnet import build_efficientnet, default_weights, load_weights, preprocess
from vidray.models.weights import file_digest as weights_digest


@pytest.fixture(scope="module")
def image2d_set(ray_cluster, stack, tmp_path_factory):
    root = f"s3://{stack.bucket}/image2d-corpus"
    synthesize(root, SynthConfig(videos=4, seed=21, min_seconds=2.0, max_seconds=3.5, workers=2), progress=False)
    manifest = storage.join(root, "manifest.parquet")
    report = run_extract(ExtractConfig(manifest=manifest, root=storage.join(root, "features"),
                                       extractor="image2d", videos_per_part=2), progress=False)
    return {"report": report, "rows": read_manifest(manifest).to_pylist(), "manifest": manifest, "root": root}


def direct_features(uri: str) -> np.ndarray:
    """The same features without Ray or the job: the frame at each second's start, 224 px centre
    crop, the pretrained network's pooled 1280-d output, L2-normalised, fp16."""
    model = build_efficientnet("lite0")
    load_weights(model)
    model.eval()
    frames = np.concatenate(list(iter_windows(uri, fps=1.0, size=224, frames_per_window=1)))
    with torch.inference_mode():
        pooled = model.features(preprocess(frames, 224))
    return torch.nn.functional.normalize(pooled, dim=-1).to(torch.float16).numpy()


def test_image2d_rows_equal_a_direct_forward_and_tell_videos_apart(image2d_set):
    feature_set = store.open_version(image2d_set["report"]["uri"])
    assert store.validate(feature_set.uri)["ok"]
    assert feature_set.manifest["dims"] == {"features": 1280}
    # The weights' digest is part of the version: other weights would make another version.
    assert feature_set.manifest["weights_digest"] == weights_digest(default_weights("lite0"))
    rows = {r["video_id"]: r for uri in feature_set.part_uris for r in store.read_parquet(uri).to_pylist()}
    assert sorted(rows) == sorted(r["video_id"] for r in image2d_set["rows"])
    means = []
    for video in image2d_set["rows"]:
        stored = np.asarray(rows[video["video_id"]]["features"], np.float16)
        expected = direct_features(video["uri"])
        assert stored.shape == expected.shape == (int(np.ceil(video["duration_s"] - 1e-9)), 1280)
        np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), atol=2e-3)
        means.append(stored.astype(np.float32).mean(0))
    means = np.stack(means) / np.linalg.norm(np.stack(means), axis=1, keepdims=True)
    cosine = means @ means.T
    # Different synthetic videos (other shapes, colours, backgrounds) give different features.
    assert cosine[~np.eye(len(means), dtype=bool)].max() < 0.95, cosine


def test_image2d_settings_change_the_version_and_bad_rates_are_refused(image2d_set):
    from vidray.config import load_config
    from vidray.data.manifest import manifest_table
    from vidray.feature_store.extract import identity
    from vidray.feature_store.extractors import Image2DExtractor

    videos = manifest_table(image2d_set["rows"])
    base = ["extractor=image2d", f"manifest={image2d_set['manifest']}", f"root={image2d_set['root']}",
            "videos_per_part=2"]
    version = lambda *extra: store.version_id(identity(load_config(ExtractConfig, None, base + list(extra)), videos))
    assert version() == store.version_id(identity(ExtractConfig(
        manifest="m", root="r", extractor="image2d", videos_per_part=2), videos))  # URIs are not content
    assert len({version(), version("image2d.block=10"), version("image2d.fps=2"),
                version("image2d.flavour=tiny")}) == 4
    assert Image2DExtractor.weights_digest(Image2DExtractConfig(flavour="tiny")).startswith("random-init")
    assert Image2DExtractor(Image2DExtractConfig(block=10)).dim == 112  # block 10 pools 112 channels
    assert Image2DExtractor(Image2DExtractConfig(flavour="tiny")).size == 64  # the flavour's resolution
    for rate in ("0.5", "1.5"):  # a window must hold a whole, equal number of frames
        with pytest.raises(ConfigError, match=r"image2d.fps.*whole number"):
            load_config(ExtractConfig, None, base + [f"image2d.fps={rate}"])


def test_vlm_takes_the_feature_width_from_the_set(image2d_set):
    uri = image2d_set["report"]["uri"]
    cfg = PretrainConfig()
    resolved = with_video_dim(cfg, uri)
    assert resolved.model.video_dim == 1280 and cfg.model.video_dim is None  # a copy
    with pytest.raises(ConfigError, match="model.video_dim.*512.*1280"):
        with_video_dim(dataclasses.replace(cfg, model=ModelConfig(video_dim=512)), uri)


# VLM pre-training on an image2d set at its width (model.video_dim from the manifest): the demo test
# (tests/test_demo.py), whose pre-training reads the pretrain_image2d set.
