"""Synthetic corpora with their feature sets (tiny-S3D + text, or frames), shared by the benchmarks."""

from __future__ import annotations

import os


def corpus(workdir: str, videos: int, seed: int) -> str:
    """Synthesize ``videos`` videos of 4-8 s under ``workdir`` (once); returns the manifest's path."""
    from vidray.data.synth import SynthConfig, synthesize

    folder = os.path.join(workdir, "corpus")
    manifest = os.path.join(folder, "manifest.parquet")
    if not os.path.exists(manifest):
        synthesize(folder, SynthConfig(videos=videos, seed=seed, min_seconds=4.0, max_seconds=8.0), progress=False)
    return manifest


def feature_sets(workdir: str, videos: int, seed: int = 5) -> dict:
    """The corpus of :func:`corpus` with its s3d and text sets; returns the two version URIs and
    the manifest."""
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import S3DExtractConfig

    manifest = corpus(workdir, videos, seed)
    common = {"manifest": manifest, "root": os.path.join(workdir, "features")}
    s3d = run_extract(ExtractConfig(**common, extractor="s3d",
                                    s3d=S3DExtractConfig(flavour="tiny", size=32)), progress=False)
    text = run_extract(ExtractConfig(**common, extractor="text"), progress=False)
    return {"s3d": s3d["uri"], "text": text["uri"], "manifest": manifest}


def frames_set(workdir: str, videos: int, num_frames: int, size: int, seed: int = 7) -> dict:
    """The corpus of :func:`corpus` with its ``frames`` set (``num_frames`` JPEG frames per caption
    clip at ``size`` px); returns its URI and the manifest."""
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import FramesExtractConfig

    manifest = corpus(workdir, videos, seed)
    report = run_extract(ExtractConfig(manifest=manifest, root=os.path.join(workdir, "features"), extractor="frames",
                                       frames=FramesExtractConfig(num_frames=num_frames, size=size)), progress=False)
    return {"frames": report["uri"], "manifest": manifest}
