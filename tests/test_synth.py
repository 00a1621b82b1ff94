"""`vidray synth`: real, decodable, deterministic MP4s whose captions say what the pixels show.

Videos are read back with PyAV directly and the manifest with pyarrow, not through vidray, so a
bug shared by writer and reader cannot hide itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from vidray import storage
from vidray.config import ConfigError, from_dict
from vidray.data import manifest
from vidray.data.synth import (COLOURS, DIRECTIONS, FILLER_WORDS, SHAPES, SynthConfig, captions,
                               plan_video, synthesize)

# Seed 8 happens to draw every shape kind, fps and frame size, and two three-shape videos.
CFG = SynthConfig(videos=6, seed=8, min_seconds=1.5, max_seconds=3.0, workers=1)
CAPTION_PART = re.compile(r"an? (\w+) (\w+) moves (\w+)")
COLOUR_DISTANCE = 60  # RGB distance under which a decoded pixel counts as a palette colour
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# The asr style of the same config: a pre-training corpus beside the clean one of the same seed.
ASR_CFG = dataclasses.replace(CFG, style="asr")
CLEAN_WORDS = {"a", "an", "and", "moves", *COLOURS, *SHAPES, *DIRECTIONS}
# sha256 of CFG's clean text outputs (manifest rows without their uri, as sorted-key JSON), taken
# before the asr style existed: the clean style must not change. A new numpy may change random
# streams (see the synth module's docstring); then re-pin after checking nothing else moved.
CLEAN_DIGESTS = {
    "qa.jsonl": "b3d0576395811c7853515d5dcdcfe0d6e9b6a4a2d65f0b97a04772211b7e7a60",
    "mc.jsonl": "3a85406a6411f293f5e3d274dc60bacf459e1df02c552c18e6c58a980ba11d78",
    "coin.json": "2afec03aa8378a3cadcc0207e6f346bb91a1db2ad3e66139f0d399a2a008b888",
    "manifest": "190923b6d422a4c690c0423b498b416b987ed8727be37d6fb9c6fc1155eb7962",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    summary = synthesize(str(out), CFG, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def asr_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("asr")
    summary = synthesize(str(out), ASR_CFG, progress=False)
    return out, summary


def read_rows(out) -> list[dict]:
    return pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def decode(source) -> tuple[list[np.ndarray], list[float], dict]:
    """Every frame (RGB), its presentation time, and the stream's header, straight from PyAV."""
    with av.open(source) as container:
        stream = container.streams.video[0]
        header = {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                  "fps": float(stream.average_rate), "size": (stream.width, stream.height)}
        frames, times = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time))
        return frames, times, header


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    parts = CAPTION_PART.findall(text)
    assert parts, f"caption {text!r} names no shape"
    return parts


def colour_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    distance = np.linalg.norm(frame.astype(np.float64) - np.array(COLOURS[colour]), axis=-1)
    return distance < COLOUR_DISTANCE


def centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) mean of the set pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def classify_shape(mask: np.ndarray) -> str:
    """Shape kind from the pixels alone, by how full a few regions of the blob's bounding box are.

    Thresholds sit between ranges measured on ~1000 decoded shapes of several seeds.
    """
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)
    height, width = box.shape

    def fullness(u0: float, u1: float, v0: float, v1: float) -> float:  # u, v in [-1, 1]
        r0, c0 = round((v0 + 1) / 2 * height), round((u0 + 1) / 2 * width)
        r1 = max(r0 + 1, round((v1 + 1) / 2 * height))
        c1 = max(c0 + 1, round((u1 + 1) / 2 * width))
        return float(box[r0:r1, c0:c1].mean())

    def mean_of_four(lo: float, hi: float) -> float:
        spans = ((-hi, -lo), (lo, hi))
        return float(np.mean([fullness(*u, *v) for u in spans for v in spans]))

    if box[: height // 2].sum() < 0.5 * box[(height + 1) // 2:].sum():
        return "triangle"  # the only kind much heavier at the bottom
    if mean_of_four(0.8, 1.0) > 0.4:
        return "square"    # the only one with full corners
    if mean_of_four(0.45, 0.65) > 0.8:
        return "circle"    # full on the diagonals, where a cross and a star are empty
    return "cross" if fullness(-0.1, 0.1, 0.8, 1.0) > 0.5 else "star"  # a star has no arm straight down


def test_every_video_decodes_and_matches_manifest(corpus):
    out, summary = corpus
    rows = read_rows(out)
    assert [r["video_id"] for r in rows] == sorted(r["video_id"] for r in rows)
    assert len(rows) == summary.videos == CFG.videos
    assert summary.frames == sum(round(r["duration_s"] * r["fps"]) for r in rows)
    seen_fps, seen_sizes = set(), set()
    for row in rows:
        assert os.path.isabs(row["uri"]) and row["uri"].startswith(str(out))
        frames, times, header = decode(row["uri"])
        assert header["codec"] == "h264" and header["pix_fmt"] == "yuv420p"
        assert header["fps"] == row["fps"] and row["fps"] in (24, 25, 30)
        assert header["size"] == (row["width"], row["height"])
        assert frames[0].shape == (row["height"], row["width"], 3)
        assert CFG.min_seconds - 1 / row["fps"] <= row["duration_s"] <= CFG.max_seconds + 1 / row["fps"]
        # duration_s is frames / fps, and the frames are evenly spaced from 0.
        assert len(frames) == round(row["duration_s"] * row["fps"])
        assert len(frames) / row["fps"] == pytest.approx(row["duration_s"], abs=1e-9)
        np.testing.assert_allclose(times, np.arange(len(frames)) / row["fps"], atol=1e-3)
        seen_fps.add(row["fps"])
        seen_sizes.add((row["width"], row["height"]))
    assert len(seen_fps) > 1 and len(seen_sizes) > 1, "fps and resolution should vary"


def test_events_tile_each_video_into_clips(corpus):
    out, summary = corpus
    rows = read_rows(out)
    assert summary.clips == sum(len(r["captions"]) for r in rows)
    assert any(len(r["captions"]) > 1 for r in rows), "some video should have several events"
    for row in rows:
        caps = row["captions"]
        assert caps[0]["start"] == 0 and caps[-1]["end"] == pytest.approx(row["duration_s"])
        for before, after in zip(caps, caps[1:]):
            assert before["end"] == after["start"]
        for cap in caps:
            frames = round((cap["end"] - cap["start"]) * row["fps"])
            assert frames >= 2, "a direction needs at least two frames"
            assert round(cap["start"] * row["fps"]) == pytest.approx(cap["start"] * row["fps"])
    assert summary.splits == {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert summary.splits["test"] == 1 and summary.splits["val"] == 1  # round(6 * 0.2), round(6 * 0.1)


def test_captions_describe_the_pixels(corpus):
    """Each event's first and last frames show exactly the named colours, with the named shape
    kind, and each colour's centroid moves the named way."""
    out, _ = corpus
    checked = 0
    for row in read_rows(out):
        frames, _, _ = decode(row["uri"])
        for cap in row["captions"]:
            first = frames[round(cap["start"] * row["fps"])]
            last = frames[round(cap["end"] * row["fps"]) - 1]
            parts = parse_caption(cap["text"])
            named = {colour for colour, _, _ in parts}
            for colour in set(COLOURS) - named:
                assert colour_mask(first, colour).sum() < 5, f"{colour} drawn but not in {cap['text']!r}"
            for colour, kind, direction in parts:
                start_mask, end_mask = colour_mask(first, colour), colour_mask(last, colour)
                assert start_mask.sum() > 100 and end_mask.sum() > 100, f"{colour} too small to learn"
                assert classify_shape(start_mask) == kind, cap["text"]
                moved = centroid(end_mask) - centroid(start_mask)
                along = float(np.dot(moved, STEP[direction]))
                across = float(abs(np.dot(moved, STEP[direction][::-1])))
                assert along > 10 and along > 3 * across, f"{cap['text']!r}: {colour} moved {moved}"
                checked += 1
    assert checked >= CFG.videos


def test_qa_and_mc_agree_with_captions(corpus):
    out, summary = corpus
    events = {(r["video_id"], c["start"], c["end"]): parse_caption(c["text"])
              for r in read_rows(out) for c in r["captions"]}
    captions = {(r["video_id"], c["start"], c["end"]): c["text"]
                for r in read_rows(out) for c in r["captions"]}
    qa = read_jsonl(out / "qa.jsonl")
    assert len(qa) == summary.qa == 3 * len(events)
    for q in qa:
        assert set(q) == {"video", "question", "answer", "type", "start", "end"}
        parts = events[(q["video"], q["start"], q["end"])]
        assert re.fullmatch(r"[a-z]+", q["answer"]), q
        if m := re.fullmatch(r"what colour is the shape moving (\w+)\?", q["question"]):
            matches = [c for c, _, d in parts if d == m[1]]
        elif m := re.fullmatch(r"what shape is moving (\w+)\?", q["question"]):
            matches = [k for _, k, d in parts if d == m[1]]
        elif m := re.fullmatch(r"which direction does the (\w+) (\w+) move\?", q["question"]):
            matches = [d for c, k, d in parts if (c, k) == (m[1], m[2])]
        else:
            raise AssertionError(f"unexpected question {q['question']!r}")
        assert matches == [q["answer"]], f"{q} vs {parts}"  # exactly one shape fits: unambiguous
        assert q["type"] == {"what colour": "colour", "what shape ": "kind", "which direc": "direction"}[q["question"][:11]]

    mc = read_jsonl(out / "mc.jsonl")
    assert len(mc) == summary.mc == len(events)
    assert {(m["video"], m["start"], m["end"]) for m in mc} == set(events)
    for m in mc:
        assert len(m["options"]) == 5 and len(set(m["options"])) == 5
        assert m["options"][m["answer"]] == captions[(m["video"], m["start"], m["end"])]
        for option in m["options"]:
            assert len(parse_caption(option)) == len(events[(m["video"], m["start"], m["end"])])
    assert len({m["answer"] for m in mc}) > 1, "the right answer should not sit at one index"


def test_coin_segments_match_captions(corpus):
    """coin.json holds one segment per caption, with its times and the first shape's direction."""
    out, summary = corpus
    assert summary.coin_uri == str(out / "coin.json")
    with open(out / "coin.json") as f:
        database = json.load(f)["database"]
    rows = read_rows(out)
    assert list(database) == [r["video_id"] for r in rows]
    subsets = {"train": "training", "val": "validation", "test": "testing"}
    for row in rows:
        entry = database[row["video_id"]]
        assert set(entry) == {"subset", "duration", "annotation"}
        assert entry["subset"] == subsets[row["split"]]
        assert entry["duration"] == row["duration_s"]
        assert len(entry["annotation"]) == len(row["captions"])
        for annotation, cap in zip(entry["annotation"], row["captions"]):
            assert annotation["segment"] == [cap["start"], cap["end"]]
            direction = parse_caption(cap["text"])[0][2]
            assert annotation["label"] == "moves " + direction
            assert annotation["id"] == {"left": "1", "right": "2", "up": "3", "down": "4"}[direction]
    labels = {a["label"] for e in database.values() for a in e["annotation"]}
    assert len(labels) > 1, "more than one action class should occur"


def test_same_seed_gives_identical_bytes(corpus, tmp_path):
    """Two runs into the same path, with different worker counts, write identical files."""
    original, _ = corpus
    out = tmp_path / "run"
    synthesize(str(out), dataclasses.replace(CFG, workers=2), progress=False)
    kept = tmp_path / "kept"
    out.rename(kept)
    synthesize(str(out), CFG, progress=False)
    names = sorted(os.path.relpath(os.path.join(d, f), kept) for d, _, fs in os.walk(kept) for f in fs)
    assert len([n for n in names if n.endswith(".mp4")]) == CFG.videos
    assert {"manifest.parquet", "qa.jsonl", "mc.jsonl", "coin.json"} <= set(names)
    for name in names:
        assert (kept / name).read_bytes() == (out / name).read_bytes(), name
    # Another directory differs only in the uri column of the manifest.
    for name in names:
        if name != "manifest.parquet":
            assert (original / name).read_bytes() == (out / name).read_bytes(), name
    here, there = read_rows(out), read_rows(original)
    assert [{**r, "uri": os.path.relpath(r["uri"], out)} for r in here] == \
           [{**r, "uri": os.path.relpath(r["uri"], original)} for r in there]


def test_different_seed_gives_different_content(corpus, tmp_path, capfd):
    original, _ = corpus
    synthesize(str(tmp_path), dataclasses.replace(CFG, seed=CFG.seed + 1), progress=True)
    # The bar draws on a terminal only: here stderr is captured, and its redraws would be noise.
    assert "\r" not in capfd.readouterr().err
    ours, theirs = read_rows(tmp_path), read_rows(original)
    assert [r["captions"] for r in ours] != [r["captions"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert open(a["uri"], "rb").read() != open(b["uri"], "rb").read(), a["video_id"]


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict(SynthConfig, {"min_seconds": 5, "max_seconds": 2})
    assert err.value.key == "min_seconds" and "max_seconds" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(SynthConfig, {"videos": 0})
    assert err.value.key == "videos"
    with pytest.raises(ConfigError) as err:
        from_dict(SynthConfig, {"val_fraction": 0.6, "test_fraction": 0.6})
    assert err.value.key == "test_fraction"
    # A hand-built config is checked too, before anything is written.
    with pytest.raises(ConfigError) as err:
        synthesize(str(tmp_path / "never"), SynthConfig(min_seconds=3, max_seconds=1), progress=False)
    assert err.value.key == "min_seconds"
    assert not (tmp_path / "never").exists()


def test_synth_to_s3(s3_uri):
    """Workers in spawned processes upload to the endpoint from the environment."""
    cfg = SynthConfig(videos=2, seed=1, min_seconds=1.0, max_seconds=1.5, workers=2)
    summary = synthesize(s3_uri, cfg, progress=False)
    assert summary.manifest_uri == f"{s3_uri}/manifest.parquet"
    names = ("manifest.parquet", "qa.jsonl", "mc.jsonl", "coin.json",
             "videos/synth_000000.mp4", "videos/synth_000001.mp4")
    for name in names:
        assert storage.exists(f"{s3_uri}/{name}"), name
    rows = manifest.read_manifest(summary.manifest_uri).to_pylist()
    assert [r["uri"] for r in rows] == [f"{s3_uri}/videos/synth_00000{i}.mp4" for i in range(2)]
    frames, _, header = decode(io.BytesIO(storage.read_bytes(rows[1]["uri"])))
    assert len(frames) == round(rows[1]["duration_s"] * rows[1]["fps"])
    assert header["size"] == (rows[1]["width"], rows[1]["height"])
    assert len(storage.read_bytes(f"{s3_uri}/qa.jsonl").splitlines()) == summary.qa


def test_clean_style_output_is_pinned(corpus):
    """The default (clean) style writes what it wrote before the asr style was added."""
    out, _ = corpus
    assert SynthConfig().style == "clean" and CFG.style == "clean"
    for name in ("qa.jsonl", "mc.jsonl", "coin.json"):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == CLEAN_DIGESTS[name], name
    rows = [{k: v for k, v in r.items() if k != "uri"} for r in read_rows(out)]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert digest == CLEAN_DIGESTS["manifest"]


def words(text: str) -> list[str]:
    return text.replace(",", "").split()


def test_asr_corpus_is_train_only_without_qa_mc_coin(asr_corpus):
    out, summary = asr_corpus
    rows = read_rows(out)
    assert sorted(os.listdir(out)) == ["manifest.parquet", "videos"]
    assert summary.qa == summary.mc == 0 and summary.coin_uri is None
    assert summary.videos == len(rows) == ASR_CFG.videos
    assert summary.clips == sum(len(r["captions"]) for r in rows)
    # val_fraction / test_fraction keep their (non-zero) defaults and are ignored.
    assert ASR_CFG.val_fraction > 0 and ASR_CFG.test_fraction > 0
    assert summary.splits == {"train": ASR_CFG.videos, "val": 0, "test": 0}
    assert {r["split"] for r in rows} == {"train"}
    assert [r["video_id"] for r in rows] == [f"asr-synth_{i:06d}" for i in range(ASR_CFG.videos)]
    assert sorted(os.listdir(out / "videos")) == [f"{r['video_id']}.mp4" for r in rows]
    for row in rows:  # real, decodable videos, as in the clean style
        frames, _, header = decode(row["uri"])
        assert len(frames) == round(row["duration_s"] * row["fps"])
        assert header["size"] == (row["width"], row["height"])


def test_asr_captions_are_noisy_speech(asr_corpus):
    """Every event is spoken with fillers, some words dropped or repeated, chatter in between,
    in the clean captions' words plus FILLER_WORDS only."""
    out, _ = asr_corpus
    event_lines, exact, chatter = 0, 0, 0
    for row in read_rows(out):
        plan = plan_video(ASR_CFG.seed, int(row["video_id"][-6:]), ASR_CFG.min_seconds,
                          ASR_CFG.max_seconds, style="asr")
        assert plan.video_id == row["video_id"]
        clean = [" ".join(words(c["text"])) for c in captions(plan)]
        spoken = [c["text"] for c in row["captions"] if "moves" in c["text"].split()]
        assert len(spoken) == len(plan.events)
        for text in (c["text"] for c in row["captions"]):
            assert set(text.split()) <= CLEAN_WORDS | FILLER_WORDS, text
            assert text == text.lower() and "," not in text
            if "moves" not in text.split():  # chatter: names nothing on screen
                assert not set(text.split()) & (set(COLOURS) | set(SHAPES)), text
                chatter += 1
        for text in spoken:
            assert text not in clean, "an event line is never the bare clean caption"
            assert text.split()[0] in FILLER_WORDS
            exact += any(f" {c} " in f" {text} " for c in clean)
            event_lines += 1
    assert chatter > 0
    assert 0 < exact < event_lines, "most event lines say the description whole, some drop or repeat a word"


def test_asr_caption_times_are_loose(asr_corpus):
    """Times are jittered off the event boundaries, within [0, duration], end > start, and
    consecutive captions may overlap."""
    out, _ = asr_corpus
    boundaries, starts, overlaps = set(), [], 0
    for row in read_rows(out):
        caps = row["captions"]
        for cap in caps:
            assert 0 <= cap["start"] < cap["end"] <= row["duration_s"], (row["video_id"], cap)
            assert round(cap["start"] * 100) == pytest.approx(cap["start"] * 100)  # centiseconds
        assert [c["start"] for c in caps] == sorted(c["start"] for c in caps)
        overlaps += sum(a["end"] > b["start"] for a, b in zip(caps, caps[1:]))
        plan = plan_video(ASR_CFG.seed, int(row["video_id"][-6:]), ASR_CFG.min_seconds,
                          ASR_CFG.max_seconds, style="asr")
        boundaries |= {(row["video_id"], round(e.first_frame / plan.fps, 2)) for e in plan.events}
        starts += [(row["video_id"], c["start"]) for c in caps]
    assert overlaps > 0
    assert sum(s not in boundaries for s in starts) > len(starts) / 2, "starts should be jittered"


def test_asr_corpus_is_deterministic_and_apart_from_clean(corpus, asr_corpus, tmp_path):
    """The same seed gives the same asr corpus; it shares no video (id, plan or bytes) with the
    clean corpus of that seed."""
    out, _ = asr_corpus
    again = tmp_path / "again"
    synthesize(str(again), dataclasses.replace(ASR_CFG, workers=2), progress=False)
    here, there = read_rows(again), read_rows(out)
    assert [{**r, "uri": os.path.relpath(r["uri"], again)} for r in here] == \
           [{**r, "uri": os.path.relpath(r["uri"], out)} for r in there]
    for a, b in zip(here, there):
        assert open(a["uri"], "rb").read() == open(b["uri"], "rb").read(), a["video_id"]

    clean_out, _ = corpus
    clean = read_rows(clean_out)
    assert not {r["video_id"] for r in clean} & {r["video_id"] for r in there}
    clean_bytes = {open(r["uri"], "rb").read() for r in clean}
    assert not any(open(r["uri"], "rb").read() in clean_bytes for r in there)
    args = (CFG.seed, CFG.min_seconds, CFG.max_seconds)
    clean_plans = [dataclasses.replace(plan_video(args[0], i, *args[1:]), video_id="", index=0)
                   for i in range(CFG.videos)]
    for i in range(ASR_CFG.videos):
        plan = plan_video(args[0], i, *args[1:], style="asr")
        assert dataclasses.replace(plan, video_id="", index=0) not in clean_plans, i


def test_style_is_checked():
    with pytest.raises(ConfigError) as err:
        from_dict(SynthConfig, {"style": "howto"})
    assert err.value.key == "style" and "asr" in str(err.value)
