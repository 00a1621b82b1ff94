"""Frames models' examples from either source: the ``frames`` feature set or the manifest's videos
decoded on the fly (``data.source=videos``). The same clips either way, bad videos skipped and named,
a short pre-training run on decoded videos that says so in MLflow, and every frames model under FSDP."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from videogen import broken_videos, write_overrunning_video
from vidray import storage
from vidray.config import ConfigError
from vidray.config.frames import FramesDataConfig, FramesModelConfig, FramesPretrainConfig
from vidray.config.train import OptimConfig, TrainConfig
from vidray.data.frames import clip_keys, examples_dataset, read_examples, read_qa, read_video_clips
from vidray.data.manifest import manifest_table, read_manifest, write_manifest
from vidray.feature_store import store
from vidray.feature_store.extractors import decode_jpeg, encode_jpeg

# The set is extracted at the model's frame count and size, so both sources sample the same times.
MODEL = FramesModelConfig(arch="allinone", flavour="tiny", image_size=32, num_frames=3, max_text_tokens=16)


@pytest.fixture
def corpus(frames_corpus):
    return frames_corpus


def _key(example: dict) -> tuple:
    return example["video_id"], example["clip_index"], example["text"]


def test_a_source_without_its_input_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"data.frames.*data.source=videos"):
        read_examples(MODEL, FramesDataConfig(manifest="m.parquet"), "train")
    with pytest.raises(ConfigError, match=r"data.manifest.*data.source=videos"):
        read_examples(MODEL, FramesDataConfig(source="videos", frames="s3://b/frames/v-1"), "train")


def test_decoded_videos_give_the_frames_set_examples(corpus, tmp_path):
    said: list[str] = []
    from_set = sorted(read_examples(MODEL, corpus["frames"], "train"), key=_key)
    decoded = sorted(read_examples(MODEL, corpus["videos"], "train", say=said.append), key=_key)
    assert said == [] and len(from_set) >= 6
    assert [_key(e) for e in decoded] == [_key(e) for e in from_set]
    for a, b in zip(decoded, from_set):
        assert a["frames"].shape == b["frames"].shape == (3, 32, 32, 3)
        np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
        # Same times, same crop: only the set's JPEG round trip (quality 90) differs, and exactly
        # so. At 32 px with sharp shape edges that is ~2.7 grey levels on average (measured).
        assert np.abs(a["frames"].astype(int) - b["frames"].astype(int)).mean() < 6.0
        np.testing.assert_array_equal(np.stack([decode_jpeg(encode_jpeg(f)) for f in a["frames"]]), b["frames"])
    # The clip rows carry the set's start times and texts, so QA (matched by start) and VQ codes
    # (keyed by video and clip index) find the same clips.
    rows = {(r["video_id"], r["clip_index"]): (r["start_s"], r["texts"])
            for uri in store.open_version(corpus["frames"].frames).part_uris
            for r in store.read_parquet(uri, ["video_id", "clip_index", "start_s", "texts"]).to_pylist()}
    clips = read_video_clips(MODEL, corpus["videos"], "train")
    assert {(c["video_id"], c["clip_index"]): (c["start_s"], c["texts"]) for c in clips} == rows
    qa = read_qa(corpus["frames"].qa)
    questions = [sorted((e["video_id"], e["text"], e["answer_text"]) for e in read_examples(MODEL, d, "train", qa))
                 for d in (corpus["frames"], corpus["videos"])]
    assert questions[0] == questions[1] and len(questions[0]) >= len(from_set)

    # Through Ray Data: the decoding tasks give exactly the in-process decode.
    ray_examples = examples_dataset(MODEL, corpus["videos"], "train", skipped_to=str(tmp_path / "skipped"),
                                    say=said.append).take_all()
    assert said == [] and len(ray_examples) == len(decoded)
    for example in ray_examples:
        assert any(np.array_equal(example["frames"], e["frames"]) and np.array_equal(example["text_ids"], e["text_ids"])
                   for e in decoded)


def test_unreadable_videos_are_skipped_and_named_while_the_rest_arrive(corpus, s3_uri, tmp_path):
    """Two unreadable videos are skipped whole; a video whose captions run past its end keeps its
    three good clips and records the clipped and the skipped caption, as the clip pipeline does."""
    bad = broken_videos(tmp_path)
    rows = read_manifest(corpus["videos"].manifest).to_pylist()
    caption = [{"start": 0.0, "end": 1.0, "text": "something moves"}]
    for kind in ("zero_byte", "truncated"):
        uri = storage.join(s3_uri, f"{kind}.mp4")
        storage.write_bytes(uri, bad[kind])
        rows.append({"video_id": kind, "uri": uri, "split": "train", "captions": caption})
    long_path, long_captions = write_overrunning_video(tmp_path / "overrun.mp4")
    rows.append({"video_id": "overrun", "uri": str(long_path), "split": "train", "captions": long_captions,
                 "duration_s": 79.5})
    manifest = storage.join(s3_uri, "mixed.parquet")
    write_manifest(manifest_table(rows), manifest)
    data = dataclasses.replace(corpus["videos"], manifest=manifest)
    good = read_examples(MODEL, corpus["videos"], "train")

    said: list[str] = []
    skipped_to = storage.join(s3_uri, "skipped")
    ds = examples_dataset(MODEL, data, "train", skipped_to=skipped_to, say=said.append)
    assert ds.count() == len(good) + 3
    note, warning = said
    assert note.startswith("note: 2 captions of split 'train' run past their video's end")
    assert warning.startswith(f"warning: skipped 2 of {len(rows)} videos of split 'train'")
    assert "zero_byte (VideoDecodeError: s3://" in warning and "empty object (0 bytes)" in warning
    assert "truncated (VideoDecodeError: s3://" in warning and "overrun" not in warning
    fs, path = storage.arrow_filesystem(storage.join(skipped_to, "quarantine.parquet"))
    records = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted((r["video_id"], r["clip_index"]) for r in records if r["clip_index"] is not None) == [
        ("overrun", 2), ("overrun", 3)]
    assert sorted(r["video_id"] for r in records if r["clip_index"] is None) == ["truncated", "zero_byte"]
    # The clips listed without decoding are the clips decoded: not the caption that starts late.
    listed = {k for k in clip_keys(MODEL, data) if k[0] == "overrun"}
    assert listed == {("overrun", 0), ("overrun", 1), ("overrun", 2)}

    said.clear()  # evaluation decodes in its own process and skips the same way
    assert len(read_examples(MODEL, data, "train", say=said.append)) == len(good) + 3
    assert len(said) == 1 and "zero_byte" in said[0] and "truncated" in said[0]


def test_pretraining_on_decoded_videos_tags_its_source(corpus, tmp_path):
    from vidray.train.frames_run import run_frames_pretrain

    cfg = FramesPretrainConfig(model=MODEL, optim=OptimConfig(lr=1e-4, warmup_steps=1),
                               train=TrainConfig(steps=3, batch_size=4, num_workers=2, checkpoint_every=3,
                                                 log_every=1, storage_path=str(tmp_path)),
                               data=corpus["videos"])
    report = run_frames_pretrain(cfg, say=lambda m: None)
    assert report["metrics"]["step"] == 3
    run = mlflow.MlflowClient().get_run(report["mlflow_run_id"])
    assert run.data.tags["data.source"] == "videos" and run.data.tags["data.manifest"] == cfg.data.manifest
    assert "feature_set.frames" not in run.data.tags and run.data.params["data.source"] == "videos"


@pytest.mark.parametrize("arch", ["allinone", "lavender", "evilm"])
def test_every_frames_model_pretrains_under_fsdp_and_checkpoints_whole_states(arch, corpus, tmp_path):
    """FSDP2 on 2 CPU workers, each pre-LN block and BERT layer its own shard unit: the run trains,
    and its checkpoint holds whole tensors under plain names that a one-device model loads."""
    import torch

    from vidray.checkpoint import load_state
    from vidray.models.allinone import Block
    from vidray.train.frames_run import run_frames_pretrain
    from vidray.train.frames_system import build_pretrain_system
    from vidray.train.parallel import transformer_layers

    cfg = FramesPretrainConfig(model=dataclasses.replace(MODEL, arch=arch), optim=OptimConfig(lr=1e-3, warmup_steps=1),
                               train=TrainConfig(steps=2, batch_size=4, num_workers=2, strategy="fsdp",
                                                 checkpoint_every=2, log_every=1, storage_path=str(tmp_path)),
                               data=corpus["frames"])
    report = run_frames_pretrain(cfg, say=lambda m: None)
    assert report["metrics"]["step"] == 2 and np.isfinite(report["metrics"]["loss"])
    assert mlflow.MlflowClient().get_run(report["mlflow_run_id"]).data.params["train.strategy"] == "fsdp"

    saved = load_state(report["checkpoint"])["model"]
    assert all(type(t) is torch.Tensor for t in saved.values())  # gathered, not DTensor shards
    plain = build_pretrain_system(cfg, torch.device("cpu")).model
    plain.load_state_dict(saved)  # strict: every name, every whole shape
    assert any(isinstance(unit, Block) for unit in transformer_layers(plain))  # the pre-LN blocks were units
