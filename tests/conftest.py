"""Session fixtures: one real local stack (moto S3 + MLflow server) and one local Ray cluster.

They use the same code users run (`vidray.stack`), started once per test session.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from vidray import stack as local_stack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """A running local stack; its environment is exported into this process (and so into Ray)."""
    directory = tmp_path_factory.mktemp("stack")
    info = local_stack.up(str(directory), bucket="vidray-test")
    saved = {k: os.environ.get(k) for k in info.env}
    os.environ.update(info.env)
    yield info
    local_stack.down(str(directory))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_uri(stack, request):
    """A fresh, empty prefix on the local S3 endpoint."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:40]
    return f"s3://{stack.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(stack):
    """One local Ray cluster for the session; started after the stack so workers inherit its env.

    More logical CPUs than cores so Ray Data tasks and Train workers can run side by side.
    """
    import ray

    from vidray.train.job import start_local_ray

    # As in an activated virtualenv: a submitted job's entrypoint `vidray` resolves on the nodes.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    start_local_ray(num_cpus=4, log_to_driver=False, runtime_env={"env_vars": dict(stack.env)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def feature_sets(ray_cluster, tmp_path_factory):
    """A synthetic corpus (16 short videos: train/val/test splits) with its tiny-S3D and text
    feature sets, shared by the pre-training and fine-tuning tests."""
    from vidray.data.synth import SynthConfig, synthesize
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import S3DExtractConfig

    root = tmp_path_factory.mktemp("vlm")
    synthesize(str(root / "corpus"), SynthConfig(videos=16, seed=11, min_seconds=4.0, max_seconds=6.0,
                                                 workers=2), progress=False)
    manifest = str(root / "corpus" / "manifest.parquet")
    common = {"manifest": manifest, "root": str(root / "features")}
    s3d = run_extract(ExtractConfig(**common, extractor="s3d",
                                    s3d=S3DExtractConfig(flavour="tiny", size=32)), progress=False)
    text = run_extract(ExtractConfig(**common, extractor="text"), progress=False)
    return {"s3d": s3d["uri"], "text": text["uri"], "root": root, "manifest": manifest,
            "corpus": root / "corpus"}


@pytest.fixture(scope="session")
def frames_corpus(ray_cluster, stack):
    """Six short synthetic videos on the local S3 endpoint (all in train) and their frames set at
    3 frames of 32 px (a tiny frames model's input): ``frames`` reads the set, ``videos`` decodes
    the manifest on the fly."""
    import dataclasses

    from vidray import storage
    from vidray.config.frames import FramesDataConfig
    from vidray.data.synth import SynthConfig, synthesize
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import FramesExtractConfig

    root = f"s3://{stack.bucket}/frames-data"
    synthesize(root, SynthConfig(videos=6, seed=21, min_seconds=2.0, max_seconds=3.0, workers=2,
                                 val_fraction=0.0, test_fraction=0.0), progress=False)
    manifest = storage.join(root, "manifest.parquet")
    frames = run_extract(ExtractConfig(manifest=manifest, root=storage.join(root, "features"), extractor="frames",
                                       frames=FramesExtractConfig(num_frames=3, size=32)), progress=False)
    sets = FramesDataConfig(frames=frames["uri"], manifest=manifest, qa=storage.join(root, "qa.jsonl"))
    return {"root": root, "frames": sets, "videos": dataclasses.replace(sets, source="videos", frames="")}
