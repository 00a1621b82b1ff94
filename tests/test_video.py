"""vidray.data.video against a naive reference that decodes every frame and picks by timestamp."""

from __future__ import annotations

import math
import os
import random
from fractions import Fraction

import av
import numpy as np
import pytest

import videogen
from videoref import Decoded, assert_matches_reference, reference_windows
from vidray import storage
from vidray.data import video
from vidray.data.video import VideoDecodeError


# -- the awkward files -----------------------------------------------------------------------


def _vfr_pts(count: int) -> list[int]:
    steps = random.Random(0).choices([20, 33, 41, 83, 125], k=count - 1)
    return [0] + list(np.cumsum(steps))


CASES = {
    "plain": dict(),
    "bframes": dict(bframes=2, gop=12),
    "start_time_mp4": dict(pts=[i + 30 for i in range(48)]),
    "start_time_mpegts": dict(pts=[i + 30 for i in range(48)], container_format="mpegts"),
    "vfr": dict(pts=_vfr_pts(48), time_base=Fraction(1, 1000)),
    "odd_size": dict(width=97, height=61, pix_fmt="yuv444p"),
    "audio_first": dict(audio_first=True),
    "short": dict(num_frames=5),
    "one_frame": dict(num_frames=1),
    # 16 s with no container index: seeks are blind and may land past the target.
    "long_mpegts": dict(num_frames=384, gop=24, bframes=2, container_format="mpegts"),
}
SUFFIX = {"mpegts": ".ts"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for name, spec in CASES.items():
        suffix = SUFFIX.get(spec.get("container_format"), ".mp4")
        paths[name] = videogen.write_video(root / f"{name}{suffix}", **spec)
    return paths


# -- sample_frames matches the reference -----------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("strategy,seed", [("uniform", None), ("random", 7)])
@pytest.mark.parametrize("num_frames", [4, 9])
def test_sample_frames_matches_reference(videos, name, strategy, seed, num_frames):
    result = video.sample_frames(videos[name], num_frames, strategy=strategy, seed=seed)
    assert result.frames.shape[0] == num_frames and result.frames.dtype == np.uint8
    assert result.timestamps.dtype == np.float64
    assert_matches_reference(videos[name], result)


def test_awkward_files_really_are_awkward(videos):
    """Guards the fixtures: each file has the property its case is named after."""
    assert videogen.has_bframes(videos["bframes"])
    for name in ("start_time_mp4", "start_time_mpegts"):
        assert video.probe(videos[name]).start_time_s == pytest.approx(1.25)
    gaps = np.diff(Decoded(videos["vfr"]).times)
    assert gaps.max() > 3 * gaps.min()
    with av.open(videos["audio_first"]) as container:
        assert [s.type for s in container.streams] == ["audio", "video"]
    info = video.probe(videos["odd_size"])
    assert (info.width, info.height) == (97, 61)


def test_start_time_is_measured_from_the_first_frame(videos):
    result = video.sample_frames(videos["start_time_mpegts"], 4)
    assert result.timestamps[0] == 0.25  # frame 6 of 24 fps, not 1.25 + 0.25


def test_short_video_repeats_frames_and_the_last_frame(videos):
    result = video.sample_frames(videos["short"], 12)  # 5 frames, 12 asked
    assert len(np.unique(result.timestamps)) == 5
    np.testing.assert_array_equal(result.frames[-1], result.frames[-2])
    one = video.sample_frames(videos["one_frame"], 3, size=16)
    assert one.frames.shape == (3, 16, 16, 3)
    assert (one.timestamps == 0.0).all()


def test_requested_times_follow_the_segments(videos):
    duration = video.probe(videos["plain"]).duration_s
    uniform = video.sample_frames(videos["plain"], 4).requested
    np.testing.assert_allclose(uniform, (np.arange(4) + 0.5) * duration / 4)
    randoms = video.sample_frames(videos["plain"], 4, strategy="random", seed=1).requested
    segment = np.floor(randoms / (duration / 4))
    np.testing.assert_array_equal(segment, np.arange(4))


def test_a_span_is_split_like_a_whole_video(videos):
    path = videos["bframes"]  # 2 s
    result = video.sample_frames(path, 4, start_s=0.5, end_s=1.5)
    np.testing.assert_allclose(result.requested, 0.5 + (np.arange(4) + 0.5) * 0.25)
    assert_matches_reference(path, result)
    clipped = video.sample_frames(path, 4, start_s=1.0, end_s=60.0)  # end_s clipped to 2 s
    np.testing.assert_allclose(clipped.requested, 1.0 + (np.arange(4) + 0.5) * 0.25)
    with pytest.raises(ValueError, match="starts after the video ends"):
        video.sample_frames(path, 4, start_s=3.0, end_s=4.0)
    with pytest.raises(ValueError, match="start_s < end_s"):
        video.sample_frames(path, 4, start_s=1.0, end_s=1.0)


@pytest.mark.parametrize("name", ["bframes", "vfr", "long_mpegts"])
def test_iter_clips_on_one_open_equals_one_call_per_span(videos, name):
    # Spans out of order and overlapping: the shared cursor must seek back correctly.
    spans = [(1.2, 1.9), (0.0, 0.6), (0.3, None), (1.0, 1.4)]
    seeds = [1, 2, 3, 4]
    together = list(video.iter_clips(videos[name], spans, 3, strategy="random", seeds=seeds, size=32))
    for (start, end), seed, got in zip(spans, seeds, together):
        alone = video.sample_frames(videos[name], 3, strategy="random", seed=seed, size=32,
                                    start_s=start, end_s=end)
        np.testing.assert_array_equal(got.frames, alone.frames)
        np.testing.assert_array_equal(got.timestamps, alone.timestamps)
    with pytest.raises(ValueError, match="seeds"):
        list(video.iter_clips(videos[name], spans, 3, seeds=[1]))


def test_iter_clips_hands_out_each_clip_before_decoding_the_next(videos):
    # The frames extractor compresses each clip as it comes: the second span lies past the end,
    # so only a generator that has not read ahead gives the first clip before failing.
    clips = video.iter_clips(videos["bframes"], [(0.0, 0.5), (500.0, 501.0)], 2, size=32)
    first = next(clips)
    assert first.frames.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="starts after the video ends"):
        next(clips)


def test_skipping_non_reference_frames_decodes_less_and_changes_nothing(tmp_path):
    # 24 fps with B-frames, then a 1.5 s gap: the answer for a time inside the gap is the last
    # frame before it, possibly a skipped B-frame, which must trigger the exact fallback.
    pts = [i * 1000 // 24 for i in range(72)] + [4500 + i * 1000 // 24 for i in range(72)]
    path = videogen.write_video(tmp_path / "gap.mp4", num_frames=len(pts), pts=pts,
                                time_base=Fraction(1, 1000), bframes=3, gop=96)
    assert videogen.has_bframes(path)
    for t in (2.9, 3.5, 4.2, 4.49, 4.5, 6.9):
        result = next(video.iter_clips(path, [(t, t + 1e-3)], 1))
        assert_matches_reference(path, result)
    dense = video.sample_frames(path, 8, strategy="random", seed=3)
    assert_matches_reference(path, dense)
    # Fewer frames decoded than frames passed over (the non-reference ones were skipped).
    last = video.sample_frames(path, 1, start_s=2.9, end_s=2.95)
    assert last.decoded_frames < 69


def test_random_strategy_is_reproducible_per_seed(videos):
    path = videos["plain"]
    a = video.sample_frames(path, 6, strategy="random", seed=3)
    b = video.sample_frames(path, 6, strategy="random", seed=3)
    c = video.sample_frames(path, 6, strategy="random", seed=4)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.requested, b.requested)
    assert not np.array_equal(a.requested, c.requested)


def test_probe_reports_the_stream(videos):
    info = video.probe(videos["plain"])
    assert info == video.VideoInfo(
        duration_s=2.0, fps=24.0, num_frames=48, width=64, height=48, rotation=0, start_time_s=0.0, codec="h264"
    )
    assert video.probe(videos["vfr"]).num_frames == 48


# -- rotation, size and crop -----------------------------------------------------------------


def test_rotation_metadata_turns_frames_upright(tmp_path):
    # A phone's "rotate 90": the stored 64x48 frames are displayed turned 90 degrees clockwise.
    path = videogen.write_video(tmp_path / "rotated.mp4", num_frames=24, rotation=-90)
    info = video.probe(path)
    assert (info.rotation, info.width, info.height) == (90, 48, 64)
    result = video.sample_frames(path, 3)
    assert result.frames.shape == (3, 64, 48, 3)
    assert_matches_reference(path, result)
    # The stored frame's top-left marker ends up top-right after a clockwise quarter turn.
    upright = result.frames[0].astype(int)
    assert upright[:8, -8:].min() > 230, "marker should be at the top right"
    assert upright[:8, :8].min() < 230 and upright[-8:, -8:].min() < 230
    stored = Decoded(path).frames[Decoded(path).index_at(result.timestamps[0])].to_ndarray(format="rgb24")
    np.testing.assert_array_equal(result.frames[0], np.rot90(stored, k=-1))


def test_size_scales_the_shorter_side_and_crops_the_centre(videos):
    path = videos["plain"]  # 64x48
    cropped = video.sample_frames(path, 2, size=32)
    uncropped = video.sample_frames(path, 2, size=32, crop=False)
    assert cropped.frames.shape == (2, 32, 32, 3)
    assert uncropped.frames.shape == (2, 32, 43, 3)
    np.testing.assert_array_equal(cropped.frames, uncropped.frames[:, :, 5:37])
    decoded = Decoded(path)
    expected = decoded.image(decoded.index_at(cropped.requested[0]), width=43, height=32)
    np.testing.assert_array_equal(uncropped.frames[0], expected)


def test_size_applies_after_rotation(tmp_path):
    path = videogen.write_video(tmp_path / "rotated.mp4", num_frames=12, width=80, height=48, rotation=-90)
    assert video.sample_frames(path, 2, size=24, crop=False).frames.shape == (2, 40, 24, 3)


# -- sparse decoding -------------------------------------------------------------------------


def test_long_gop_decodes_a_small_part_of_the_file(tmp_path):
    gop, total = 25, 300
    path = videogen.write_video(tmp_path / "long_gop.mp4", num_frames=total, gop=gop, bframes=2, fps=25)
    result = video.sample_frames(path, 4)
    assert_matches_reference(path, result)
    # Each sample costs at most one GOP plus the look-ahead frame; the whole file is 300.
    assert result.decoded_frames <= 4 * (gop + 2)
    assert result.decoded_frames < total / 4


def test_nearby_times_reuse_the_decoder_instead_of_seeking(tmp_path, monkeypatch):
    path = videogen.write_video(tmp_path / "one_gop.mp4", num_frames=48, gop=48)
    seeks = []
    original = av.container.InputContainer.seek
    monkeypatch.setattr(av.container.InputContainer, "seek", lambda self, *a, **k: seeks.append(a) or original(self, *a, **k))
    result = video.sample_frames(path, 8)
    assert seeks == []  # a single GOP: decode forward once
    assert result.decoded_frames <= 48


def test_blind_seeks_without_an_index_step_back_until_at_or_before_the_target(videos, monkeypatch):
    seeks = []
    original = av.container.InputContainer.seek
    monkeypatch.setattr(av.container.InputContainer, "seek", lambda self, *a, **k: seeks.append(a) or original(self, *a, **k))
    result = video.sample_frames(videos["long_mpegts"], 4)
    assert len(seeks) >= 3
    assert_matches_reference(videos["long_mpegts"], result)
    assert result.decoded_frames < 384 / 3


# -- iter_windows ----------------------------------------------------------------------------


def test_iter_windows_shapes_and_count(tmp_path):
    path = videogen.write_video(tmp_path / "pal.mp4", num_frames=63, fps=25)  # 2.52 s at 25 fps
    windows = list(video.iter_windows(path))
    assert len(windows) == math.ceil(2.52 * 30 / 30) == 3
    assert all(w.shape == (30, 224, 224, 3) and w.dtype == np.uint8 for w in windows)
    frames = np.concatenate(windows)
    real = math.ceil(2.52 * 30)  # 76 output frames inside the video, then padding
    # 64x48 -> shorter side 224 -> 299x224, centre crop 224 starting at column 37.
    expected = reference_windows(path, 30.0, real, width=299, height=224)[:, :, 37:261]
    np.testing.assert_array_equal(frames[:real], expected)
    assert (frames[real:] == frames[real - 1]).all()


@pytest.mark.parametrize("source_fps", [24, 25, 60])
def test_iter_windows_picks_frames_by_timestamp(tmp_path, source_fps):
    # A square source at the output size: no scaling, so pixels compare exactly.
    path = videogen.write_video(tmp_path / "square.mp4", num_frames=source_fps * 2, fps=source_fps, width=32, height=32)
    frames = np.concatenate(list(video.iter_windows(path, size=32, frames_per_window=16)))
    assert frames.shape == (64, 32, 32, 3)  # ceil(2 s * 30 / 16) = 4 windows
    np.testing.assert_array_equal(frames[:60], reference_windows(path, 30.0, 60))
    assert (frames[60:] == frames[59]).all()


# -- errors ----------------------------------------------------------------------------------


def assert_decode_error(source, *words: str, **kwargs) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as info:
        video.sample_frames(source, 2, **kwargs)
    error = info.value
    uri = os.fspath(source) if not isinstance(source, bytes) else f"<{len(source)} bytes>"
    assert error.uri == uri and str(error).startswith(f"{uri}: ")
    for word in words:
        assert word in error.reason, f"{word!r} not in {error.reason!r}"
    return error


def test_bytes_sources_are_named_by_the_given_uri():
    with pytest.raises(VideoDecodeError) as info:
        video.sample_frames(b"not a video at all" * 100, 2, uri="s3://bucket/clip.mp4")
    assert info.value.uri == "s3://bucket/clip.mp4"
    assert str(info.value).startswith("s3://bucket/clip.mp4: ")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert_decode_error(str(path), "empty")
    assert_decode_error(b"", "empty")


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_file(videos, tmp_path, faststart):
    # moov at the end: the index is missing; faststart: the index is there, the samples are not.
    whole = videogen.write_video(tmp_path / "whole.mp4", num_frames=96, faststart=faststart)
    cut = videogen.truncate_copy(whole, tmp_path / "cut.mp4", 0.3)
    assert_decode_error(cut, "truncated")


def test_not_a_video(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).bytes(20000))
    assert_decode_error(str(noise), "invalid")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a video\n" * 50)
    assert_decode_error(str(text), "not a video", "text")


def test_audio_only_file(tmp_path):
    path = videogen.write_audio_only(tmp_path / "speech.m4a")
    assert_decode_error(path, "no video stream", "audio")


def test_raw_stream_without_timestamps(tmp_path):
    path = videogen.write_video(tmp_path / "raw.h264", container_format="h264")
    assert_decode_error(path, "no timestamps")


def test_missing_local_file(tmp_path):
    assert_decode_error(str(tmp_path / "nope.mp4"), "no such file")


def test_directory_instead_of_file(tmp_path):
    assert_decode_error(str(tmp_path), "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(videos, tmp_path):
    path = tmp_path / "locked.mp4"
    path.write_bytes(open(videos["plain"], "rb").read())
    path.chmod(0)
    assert_decode_error(str(path), "permission denied")


def test_tiny_timeout(videos):
    assert_decode_error(videos["plain"], "timeout", timeout_s=1e-9)
    with pytest.raises(VideoDecodeError, match="timeout"):
        list(video.iter_windows(videos["plain"], timeout_s=1e-9))


def test_bad_arguments_are_value_errors(videos):
    with pytest.raises(ValueError, match="num_frames"):
        video.sample_frames(videos["plain"], 0)
    with pytest.raises(ValueError, match="strategy"):
        video.sample_frames(videos["plain"], 2, strategy="middle")


# -- other sources ---------------------------------------------------------------------------


def test_bytes_source_equals_path(videos):
    path = videos["bframes"]
    from_path = video.sample_frames(path, 5, size=32)
    from_bytes = video.sample_frames(open(path, "rb").read(), 5, size=32)
    np.testing.assert_array_equal(from_bytes.frames, from_path.frames)
    np.testing.assert_array_equal(from_bytes.timestamps, from_path.timestamps)


def test_s3_source_equals_local(videos, s3_uri):
    local = videos["bframes"]
    uri = storage.join(s3_uri, "clip.mp4")
    storage.write_bytes(uri, open(local, "rb").read())
    remote = video.sample_frames(uri, 5, strategy="random", seed=2)
    expected = video.sample_frames(local, 5, strategy="random", seed=2)
    np.testing.assert_array_equal(remote.frames, expected.frames)
    np.testing.assert_array_equal(remote.timestamps, expected.timestamps)
    assert video.probe(uri) == video.probe(local)


def test_missing_s3_object(s3_uri):
    uri = storage.join(s3_uri, "missing.mp4")
    assert_decode_error(uri, "no such file")
