"""A synthetic corpus with its tiny-S3D and text feature sets, shared by the training benchmarks."""

from __future__ import annotations

import os


def feature_sets(workdir: str, videos: int, seed: int = 5) -> dict:
    """Synthesize ``videos`` videos under ``workdir`` (once) and extract their s3d and text sets;
    returns the two version URIs and the manifest."""
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import S3DExtractConfig
    from vidray.synth import SynthConfig, synthesize

    corpus = os.path.join(workdir, "corpus")
    manifest = os.path.join(corpus, "manifest.parquet")
    if not os.path.exists(manifest):
        synthesize(corpus, SynthConfig(videos=videos, seed=seed, min_seconds=4.0, max_seconds=8.0),
                   progress=False)
    common = {"manifest": manifest, "root": os.path.join(workdir, "features")}
    s3d = run_extract(ExtractConfig(**common, extractor="s3d",
                                    s3d=S3DExtractConfig(flavour="tiny", size=32)), progress=False)
    text = run_extract(ExtractConfig(**common, extractor="text"), progress=False)
    return {"s3d": s3d["uri"], "text": text["uri"], "manifest": manifest}
