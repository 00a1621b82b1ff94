"""Read frames from videos with PyAV: probe, seek-based sparse sampling, fixed-fps windows.

    from vidray.data import video

    info = video.probe("s3://bucket/clip.mp4")          # VideoInfo(duration_s=12.0, fps=25.0, ...)
    sample = video.sample_frames("clip.mp4", 8, size=224, strategy="random", seed=0)
    clip = video.sample_frames(data, 4, start_s=3.0, end_s=7.5, uri="s3://bucket/clip.mp4")
    sample.frames       # uint8 [8, 224, 224, 3], RGB, upright
    sample.timestamps   # float64 [8], seconds from the first frame of the video stream
    for window in video.iter_windows("clip.mp4"):       # uint8 [30, 224, 224, 3]: one second
        ...                                              # at 30 fps, the S3D input

Public names: :func:`probe`, :func:`sample_frames`, :func:`iter_clips`, :func:`iter_windows`, :class:`VideoInfo`,
:class:`SampledFrames`, :class:`SkippedSpan`, :class:`VideoDecodeError`.

A source is a local path, any URI :func:`vidray.storage.open_uri` understands (``s3://...``),
or the file's ``bytes``. Times are in seconds from the first frame of the video stream, which is
0.0 whatever the container's start time. The frame for time ``t`` is the last frame whose
presentation time is ``<= t`` (the first frame for times before it, the last frame for times
after the end). Frames come out upright: the container's display-matrix rotation is applied.

Unreadable input of any kind raises :class:`VideoDecodeError`, the one exception type callers
(the clip pipeline's quarantine) need to catch.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Iterator, Union

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vidray import storage

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

STRATEGIES = ("uniform", "random")
# Without a container index (MPEG-TS) we cannot know where keyframes are; decoding forward
# this many seconds costs about as much as one seek plus a typical partial GOP.
_BLIND_SEEK_GAP_S = 2.0
# After a seek that lands past the target (a demuxer without an exact index), step back
# this far, doubling each time, until the first decoded frame is at or before the target.
_FIRST_BACKOFF_S = 0.5
# Non-reference frames are skipped only this many frame intervals before a requested time.
_SKIP_MARGIN_FRAMES = 2
# FFmpeg opens text files (tty) and still images as one-stream "videos"; they are not videos.
# One decoded RGB frame of 8K UHD is 100 MB; a larger one (a corrupt header can claim 65535x65535)
# would take a decode worker's memory before we could say anything.
MAX_FRAME_PIXELS = 7680 * 4320
_NOT_VIDEO_FORMATS = {"tty": "a text file", "image2": "a still image"}
# Containers whose sample table lists every frame with its duration: their stream duration and
# frame count are exact. Others (Matroska/WebM count from 0 whatever the first frame's time,
# MPEG-TS estimates, AVI headers can be stale) are measured from the stream's last packets.
_FRAME_TABLE_FORMATS = {"mov", "mp4"}
# DivX/XviD "packed B-frames" (MPEG-4 Part 2 in AVI) come out of the decoder with permuted pts;
# this many frames from the start tell whether pts run backwards (see _Reader._pts_run_backwards).
_PTS_SCAN_FRAMES = 48
# Packets read from the end to find the last frame's end: more than any B-frame reorder span.
_TAIL_PACKETS = 32


def decode_threads() -> int:
    """Decoder threads for a video opened in this process: ``$VIDRAY_DECODE_THREADS`` if set,
    else the CPUs Ray gave the task or actor that opens it (1 for a Ray Data map task), else 1
    (outside Ray the caller's processes are assumed to use the cores already)."""
    if os.environ.get("VIDRAY_DECODE_THREADS"):
        return max(1, int(os.environ["VIDRAY_DECODE_THREADS"]))
    ray = sys.modules.get("ray")  # not imported here: a plain script never pays for Ray
    if ray is not None and ray.is_initialized():
        try:
            return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        except AssertionError:  # the driver, which Ray assigns nothing (it says so by asserting)
            pass
    return 1


class VideoDecodeError(RuntimeError):
    """A video could not be read; ``uri`` names it, ``reason`` says why.

    The one exception type for unreadable input: missing or unreadable file or object, empty,
    truncated or corrupt data, not a video, no video stream, no decoder, decode timeout.
    """

    def __init__(self, uri: str, reason: str, hint: str = "") -> None:
        self.uri = uri
        self.reason = reason
        self.hint = hint
        super().__init__(f"{uri}: {reason}" + (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video's first video stream."""

    duration_s: float
    """Length of the video stream in seconds (from its first frame)."""
    fps: float
    """Average frame rate (frames per second)."""
    num_frames: int
    """Frames the stream holds: counted from the container's per-frame index (MP4/MOV sample
    table, AVI index) when it has one, else ``round(duration_s * fps)`` (see ``num_frames_exact``)."""
    width: int
    """Width of the upright (rotated) frames."""
    height: int
    """Height of the upright (rotated) frames."""
    rotation: int
    """Degrees (0, 90, 180, 270) the stored frames are turned clockwise to display upright."""
    start_time_s: float
    """Presentation time of the first frame in the container's timeline (often 0.0)."""
    codec: str
    """FFmpeg decoder name, e.g. ``"h264"``."""
    num_frames_exact: bool = True
    """False when ``num_frames`` is an estimate from duration and frame rate (MKV, WebM, MPEG-TS)."""


@dataclass
class SampledFrames:
    """Frames picked by :func:`sample_frames`."""

    frames: np.ndarray
    """uint8 [T, H, W, 3], RGB, upright."""
    timestamps: np.ndarray
    """float64 [T]: presentation time (seconds from the first frame) of each returned frame."""
    requested: np.ndarray
    """float64 [T]: the times that were asked for."""
    decoded_frames: int
    """Frames the decoder produced to get these (benchmarks report it per returned frame)."""
    start_s: float = 0.0
    """Start of the span the times were spread over (seconds)."""
    end_s: float = 0.0
    """End of that span: the asked-for end, or the video's duration where the span ran past it."""
    video_duration_s: float = 0.0
    """Duration of the whole video (see :class:`VideoInfo`)."""


@dataclass(frozen=True)
class SkippedSpan:
    """What ``iter_clips(..., past_end="skip")`` yields for a span that starts at or after the
    end of the video: the span as asked for, and the video's duration."""

    start_s: float
    end_s: float | None
    video_duration_s: float


def probe(source: Source, *, timeout_s: float = 60.0, uri: str | None = None) -> VideoInfo:
    """Describe the first video stream of ``source``: decodes its first frame (MPEG-4 Part 2: up
    to 48, to settle its timestamps) and, outside MP4/MOV, demuxes the packets at its end to
    measure the duration.

    Raises :class:`VideoDecodeError` if the source cannot be read as a video. ``uri`` names
    the video in error messages when ``source`` is its bytes.
    """
    with _Reader(source, timeout_s, uri) as reader:
        return reader.info()


def sample_frames(
    source: Source,
    num_frames: int,
    *,
    strategy: str = "uniform",
    size: int | None = None,
    seed: int | None = None,
    crop: bool = True,
    timeout_s: float = 60.0,
    start_s: float = 0.0,
    end_s: float | None = None,
    uri: str | None = None,
) -> SampledFrames:
    """Pick ``num_frames`` frames spread over the video, decoding as little as possible.

    The span ``[start_s, end_s)`` (default: the whole video; ``end_s`` is clipped to the
    duration) is split into ``num_frames`` equal segments; ``"uniform"`` asks for each
    segment's centre, ``"random"`` for a uniform random time inside each segment (drawn with
    ``np.random.default_rng(seed)``). The frame for time ``t`` is the last frame whose
    presentation time is ``<= t``; so a video with fewer frames than asked for gives repeated
    frames, and times past the last frame repeat the last frame. A one-frame video returns that
    frame ``num_frames`` times.

    Decoding seeks to the keyframe before each time and decodes forward only up to it; when
    the next time lies in the GOP being decoded it decodes on instead of seeking again.

    ``size``: ``None`` keeps the native (upright) size; an int scales the shorter side to
    ``size`` and, with ``crop=True``, centre-crops to ``size x size``.
    ``timeout_s`` bounds the whole call; a slower (pathological) file raises
    :class:`VideoDecodeError`, as does any unreadable input. ``uri`` names the video in error
    messages when ``source`` is its bytes. A span that starts at or after the end of the video
    raises ``ValueError``.
    """
    return list(iter_clips(source, [(start_s, end_s)], num_frames, strategy=strategy, size=size,
                           seeds=[seed], crop=crop, timeout_s=timeout_s, uri=uri))[0]


def iter_clips(
    source: Source,
    spans: list[tuple[float, float | None]],
    num_frames: int,
    *,
    strategy: str = "uniform",
    size: int | None = None,
    seeds: list[int | None] | None = None,
    crop: bool = True,
    timeout_s: float = 60.0,
    uri: str | None = None,
    past_end: str = "raise",
) -> Iterator[SampledFrames | SkippedSpan]:
    """:func:`sample_frames` for several spans ``(start_s, end_s)`` of one video, opened once,
    one clip at a time.

    The clip pipeline's path: a HowTo100M video has dozens of caption clips, and reopening the
    container (and decoding its first frame) for each would double the work. ``seeds[i]`` seeds
    span ``i``'s random times. ``decoded_frames`` of each result counts the frames decoded since
    the previous span. A generator, so that a caller that compresses or writes each clip as it
    comes holds one clip's raw frames, not a whole video's (a one-hour video with a caption every
    5 s is 720 clips, 430 MB at 4 x 224 px; BENCHMARKS.md, memory); ``list()`` it for them all.
    Arguments are checked when the generator is first advanced.

    A span that ends after the video is clipped to its duration (``end_s`` of the result says
    so). A span that starts at or after the end raises ``ValueError``, or with
    ``past_end="skip"`` yields a :class:`SkippedSpan` in its place and goes on with the next span:
    ASR captions (HowTo100M) often run past the file, and one of them must not cost the video's
    good clips."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if past_end not in ("raise", "skip"):
        raise ValueError(f"past_end must be 'raise' or 'skip', got {past_end!r}")
    seeds = list(seeds) if seeds is not None else [None] * len(spans)
    if len(seeds) != len(spans):
        raise ValueError(f"got {len(seeds)} seeds for {len(spans)} spans")
    for start_s, end_s in spans:
        if start_s < 0 or (end_s is not None and end_s <= start_s):
            raise ValueError(f"need 0 <= start_s < end_s, got start_s={start_s}, end_s={end_s}")
    with _Reader(source, timeout_s, uri) as reader:
        cursor = _SparseCursor(reader)
        convert = _Converter(reader, size, crop)
        decoded_before = 0
        for (start_s, end_s), seed in zip(spans, seeds):
            end = reader.duration_s if end_s is None else min(end_s, reader.duration_s)
            if start_s >= end:
                if past_end == "skip":
                    yield SkippedSpan(start_s, end_s, reader.duration_s)
                    continue
                raise ValueError(
                    f"{reader.uri}: span [{start_s}, {end_s}) starts after the video ends "
                    f"({reader.duration_s:.3f} s); check the clip times"
                )
            requested = _segment_times(start_s, end, num_frames, strategy, seed)
            images, times = [], []
            previous: av.VideoFrame | None = None
            for t in requested:
                frame = cursor.frame_at(float(t))
                if frame is not previous:  # convert now: holding native frames costs memory
                    image, previous = convert(frame), frame
                images.append(image)
                times.append(reader.seconds(frame))
            decoded = reader.decoded_frames - decoded_before
            decoded_before = reader.decoded_frames
            yield SampledFrames(frames=np.stack(images), timestamps=np.array(times, np.float64),
                                requested=requested, decoded_frames=decoded, start_s=start_s, end_s=end,
                                video_duration_s=reader.duration_s)


def iter_windows(
    source: Source,
    *,
    fps: float = 30.0,
    size: int = 224,
    frames_per_window: int = 30,
    timeout_s: float | None = None,
    uri: str | None = None,
) -> Iterator[np.ndarray]:
    """Yield the video resampled to ``fps`` as uint8 ``[frames_per_window, size, size, 3]`` chunks.

    The S3D feature reader: output frame ``k`` is the last source frame with presentation time
    ``<= k / fps``, so 24/25 fps sources repeat frames and 60 fps sources drop them (dropped
    frames are decoded but never converted). Each frame's shorter side is scaled to ``size``,
    then centre-cropped to ``size x size``. There are ``ceil(duration * fps / frames_per_window)``
    windows; the last partial window is padded by repeating its last frame.

    Memory stays bounded for any length: frames are decoded in one forward pass and only the
    current source frame, the window being filled and the decoder's own few reference frames
    are held, never the whole video. ``timeout_s`` bounds the whole pass; ``None`` allows
    60 s plus 2 s per second of video. ``uri`` names the video in errors for ``bytes`` sources.
    """
    if fps <= 0 or size < 1 or frames_per_window < 1:
        raise ValueError(f"need fps > 0, size >= 1, frames_per_window >= 1; got {fps}, {size}, {frames_per_window}")
    return _windows(source, fps, size, frames_per_window, timeout_s, uri)


def _windows(
    source: Source, fps: float, size: int, frames_per_window: int, timeout_s: float | None, uri: str | None
) -> Iterator[np.ndarray]:
    # Opening gets 60 s; the length-dependent default is known only once the duration is.
    with _Reader(source, 60.0 if timeout_s is None else timeout_s, uri) as reader:
        if timeout_s is None:
            reader.deadline.extend_to(60.0 + 2.0 * reader.duration_s)
        real = max(1, math.ceil(reader.duration_s * fps - 1e-9))
        window: list[np.ndarray] = []
        for image in _resampled(reader, fps, real, _Converter(reader, size, crop=True)):
            window.append(image)
            if len(window) == frames_per_window:
                yield np.stack(window)
                window = []
        if window:
            window += [window[-1]] * (frames_per_window - len(window))
            yield np.stack(window)


def _segment_times(start_s: float, end_s: float, count: int, strategy: str, seed: int | None) -> np.ndarray:
    """One time (seconds) in each of ``count`` equal segments of ``[start_s, end_s)``."""
    if strategy == "uniform":
        offsets = np.full(count, 0.5)
    else:
        offsets = np.random.default_rng(seed).uniform(0.0, 1.0, count)
    return start_s + (np.arange(count) + offsets) * ((end_s - start_s) / count)


def _resampled(reader: _Reader, fps: float, count: int, convert: _Converter) -> Iterator[np.ndarray]:
    """``count`` frames at ``k / fps``: the last source frame at or before each time."""
    k = 0
    held: av.VideoFrame | None = None
    held_image: np.ndarray | None = None
    rate = Fraction(fps)
    limit = reader.last_pts_at(0)  # the last pts shown at or before k / fps
    for frame in reader.frames_from_start():
        # `frame` starts after k / fps, so `held` is the last frame at or before it.
        while held is not None and k < count and frame.pts > limit:
            if held_image is None:
                held_image = convert(held)
            yield held_image
            k += 1
            limit = reader.last_pts_at(k / rate)
        if k >= count:
            return
        held, held_image = frame, None
    image = convert(held)
    for _ in range(k, count):
        yield image


class _Deadline:
    """Raises once ``timeout_s`` has passed since it was made (checked per packet and frame)."""

    def __init__(self, uri: str, timeout_s: float | None) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.start = time.monotonic()

    def extend_to(self, timeout_s: float) -> None:
        """Allow ``timeout_s`` in all, counted from the start."""
        self.timeout_s = timeout_s

    def check(self) -> None:
        if self.timeout_s is not None and time.monotonic() - self.start > self.timeout_s:
            raise VideoDecodeError(
                self.uri,
                f"decoding took longer than timeout_s={self.timeout_s:g}",
                "the file may be pathological; pass a larger timeout_s if it is just long",
            )


class _Reader:
    """One open video stream: container, first frame, timestamps and forward decoding.

    Times are seconds from the first decoded frame (``origin``). The first frame is decoded on
    open because it is the only reliable source of the stream's first presentation time and of
    the display rotation (PyAV exposes the display matrix on frames, not streams), and because
    it proves the stream is decodable before any work is planned on it.
    """

    def __init__(self, source: Source, timeout_s: float | None, uri: str | None = None) -> None:
        self.uri = uri or _describe(source)
        self.deadline = _Deadline(self.uri, timeout_s)
        self.decoded_frames = 0
        # Packets with a pts below this are decoded with non-reference frames skipped (see
        # _SparseCursor.frame_at); None decodes everything.
        self.skip_before: int | None = None
        self._skipping = False
        self.skipped_since_seek = False
        self._file: IO[bytes] | None = None  # our handle on a remote object, if any
        try:
            self.container = self._open(source)
        except BaseException:
            self._close_file()
            raise
        try:
            self.stream = self._video_stream()
            self.time_base: Fraction = self.stream.time_base
            # MPEG-TS and friends build their index while demuxing; only an index that exists
            # before we read anything (MP4 sample tables, MKV cues) lists every keyframe.
            self.has_index = len(self.stream.index_entries) > 0
            self.timestamps_from_dts = False
            self._last_stamp: int | None = None
            self._frames = self._decode()
            self.first = self._first_frame()
            self.origin: int = self.first.pts
            self.rotation = (-round(self.first.rotation or 0)) % 360
            self._end_pts = self._measure_stream()
            self.duration_s = self._duration_s()
            # Fixed once the stream is measured; the sampler reads them for every frame it seeks.
            self.counted_frames = self._count_frames()
            self.fps = self._average_fps()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _open(self, source: Source) -> av.container.InputContainer:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise VideoDecodeError(self.uri, "empty input (0 bytes)", "pass the file's bytes")
            target: str | IO[bytes] = io.BytesIO(bytes(source))
        else:
            target = self._local_path_or_file(os.fspath(source))
        self._target = target
        container = self._av_open(target)
        format_name = container.format.name
        kind = _NOT_VIDEO_FORMATS.get(format_name) or ("a still image" if format_name.endswith("_pipe") else None)
        if kind:
            container.close()
            raise VideoDecodeError(self.uri, f"not a video: FFmpeg reads it as {kind} ({format_name})")
        return container

    def _av_open(self, target: str | IO[bytes]) -> av.container.InputContainer:
        try:
            return av.open(target, metadata_errors="ignore")
        except (av.error.FFmpegError, OSError) as err:
            raise VideoDecodeError(self.uri, *_explain(err)) from err

    def _local_path_or_file(self, uri: str) -> str | IO[bytes]:
        """A local path (FFmpeg reads it directly) or an open file object for remote URIs."""
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if storage.is_remote(uri):
            try:
                self._file = storage.open_uri(uri, "rb")
            except storage.StorageError as err:
                reason = str(err).removeprefix(f"{uri}: ")
                raise VideoDecodeError(self.uri, reason) from err
            if getattr(self._file, "size", None) == 0:
                raise VideoDecodeError(self.uri, "empty object (0 bytes)", "re-upload the video")
            return self._file
        if os.path.isfile(uri) and os.path.getsize(uri) == 0:
            raise VideoDecodeError(self.uri, "empty file (0 bytes)", "re-download or re-encode the video")
        return uri

    def _video_stream(self) -> av.video.stream.VideoStream:
        streams = self.container.streams
        if not streams.video:
            kinds = ", ".join(s.type for s in streams) or "none"
            raise VideoDecodeError(self.uri, f"no video stream (streams: {kinds})", "is it an audio-only file?")
        stream = streams.video[0]
        if stream.codec_context is None:
            raise VideoDecodeError(self.uri, "no decoder for its video codec in this FFmpeg build")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_FRAME_PIXELS:
            raise VideoDecodeError(self.uri, f"frames of {width}x{height} are larger than 8K UHD (7680x4320), "
                                   "the most a decode worker takes", "scale it down first, e.g. "
                                   "`ffmpeg -i in.mp4 -vf scale=-2:2160 out.mp4`")
        # FFmpeg's default (slice threads, one per core of the machine) oversubscribes a node where
        # every core runs its own decode task; a task that holds several cores decodes frames in
        # parallel instead (FFmpeg applies skip_frame per packet sent, so skipping is unchanged).
        threads = decode_threads()
        stream.thread_count = threads
        if threads > 1:
            stream.thread_type = "AUTO"
        return stream

    def _first_frame(self) -> av.VideoFrame:
        first = next(self._frames, None)
        if first is None:
            raise VideoDecodeError(self.uri, "the video stream has no decodable frames", "the file may be truncated")
        return first

    # -- measuring the stream ----------------------------------------------------------------

    def _measure_stream(self) -> int | None:
        """Settle the timestamp rule and find where the last frame ends (pts), before any frame
        is handed out; the reader is left at the first frame. None: the container's frame table
        is exact (MP4/MOV), or the end could not be measured."""
        moved = False
        if self.stream.codec_context.name == "mpeg4":  # the only codec with packed B-frames
            self.timestamps_from_dts = self._pts_run_backwards()
            moved = True
        end = None
        if not self._has_frame_table():
            end, moved = self._scan_end(), True
        if moved:
            self._rewind()
        return end

    def _has_frame_table(self) -> bool:
        return bool(_FRAME_TABLE_FORMATS & set(self.container.format.name.split(","))) and bool(self.stream.duration)

    def _pts_run_backwards(self) -> bool:
        """FFmpeg's best-effort timestamp rule, decided once per stream: use the decoder's dts when
        pts go backwards more often than dts over the first frames. Frames leave the decoder in
        presentation order, so rising times are the truth; with packed B-frames the parser gives
        each B-frame its neighbour's pts (1,2,3,5,4,6,8,7,...) while dts rise. Deciding from the
        start, not frame by frame, keeps the times the same whatever was seeked or decoded."""
        faulty_pts = faulty_dts = 0
        last_pts, last_dts = self.first.pts, self.first.dts
        for _ in range(_PTS_SCAN_FRAMES):
            frame = next(self._frames, None)
            if frame is None:
                break
            if frame.dts is not None:
                faulty_dts += last_dts is not None and frame.dts <= last_dts
                last_dts = frame.dts
            faulty_pts += frame.pts <= last_pts
            last_pts = frame.pts
        return faulty_pts > faulty_dts

    def _scan_end(self) -> int | None:
        """End (pts) of the stream's last frame, from the packets near the end (no decoding).

        The duration is the span of the frames, whatever the container says: Matroska's segment
        duration counts from 0, so a file whose first frame is at 3 s claimed 3 s too many.
        Without an index (MPEG-TS) a seek past the end lands on the very last packets, which need
        not hold the last frame's pts (B-frames): step back until enough packets were read."""
        seek_to = self.origin + math.ceil((Fraction(self.container.duration or 0, av.time_base) + 3600)
                                          / self.time_base)
        step = math.ceil(1.0 / self.time_base)
        while True:
            spans = self._packet_spans_from(seek_to)
            if spans is None:
                return None
            if len(spans) >= _TAIL_PACKETS or seek_to <= self.origin:
                break
            earliest = min((start for start, _ in spans), default=seek_to)
            seek_to, step = max(self.origin, min(seek_to, earliest) - step), step * 2
        ends = [finish for _, finish in spans]
        return max(ends) if ends and max(ends) > self.origin else None

    def _packet_spans_from(self, offset: int) -> list[tuple[int, int]] | None:
        """(start, end) pts of every packet from the keyframe before ``offset`` to the end of the
        file; None when the demuxer cannot seek."""
        try:
            self.container.seek(offset, stream=self.stream, backward=True)
        except av.error.FFmpegError:
            return None
        spans = []
        try:
            for packet in self.container.demux(self.stream):
                self.deadline.check()
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None:
                    spans.append((stamp, stamp + (packet.duration or self._frame_ticks())))
        except (av.error.FFmpegError, OSError):
            pass  # a damaged tail: the end is the last packet read; decoding will say more
        return spans

    def _frame_ticks(self) -> int:
        """One frame interval in stream ticks (at the stated rate; 1 when none is stated)."""
        rate = self.stream.average_rate or self.stream.guessed_rate
        return max(1, round(1 / (rate * self.time_base))) if rate else 1

    def _rewind(self) -> None:
        """Back to the first frame after measuring, under the timestamp rule now settled."""
        raw_first = self.first
        expected = raw_first.dts if self.timestamps_from_dts and raw_first.dts is not None else raw_first.pts
        self.first = self.restart(raw_first.pts, expected)
        self.origin = self.first.pts

    def restart(self, first_pts: int, expected_pts: int | None = None) -> av.VideoFrame:
        """Decode from the stream's first frame again; returns it.

        Seeks a second before ``first_pts`` (some demuxers, MPEG-TS, asked for the very first
        timestamp land on a later keyframe); where that fails (AVI refuses a time before its
        start) or lands elsewhere, the container is opened again."""
        try:
            first = self.seek(first_pts - math.ceil(1.0 / self.time_base))
        except VideoDecodeError:
            first = None
        if first is None or first.pts != (first_pts if expected_pts is None else expected_pts):
            self._reopen()
            first = self._first_frame()
        return first

    def _reopen(self) -> None:
        self._frames.close()
        self.container.close()
        if hasattr(self._target, "seek"):
            self._target.seek(0)
        self.container = self._av_open(self._target)
        self.stream = self._video_stream()
        self._skipping = False
        self._decode_afresh()

    def _duration_s(self) -> float:
        stream, container = self.stream, self.container
        if self._end_pts is not None:
            return float((self._end_pts - self.origin) * self.time_base)
        if stream.duration:
            return float(stream.duration * self.time_base)
        if container.duration:
            # The container's span over all streams, minus the time before our first frame.
            start = (container.start_time or 0) / av.time_base
            return max(container.duration / av.time_base - (self.container_seconds(self.origin) - start), 0.0)
        raise VideoDecodeError(self.uri, "the container states no duration", "remux it into MP4 or MKV")

    def close(self) -> None:
        self.container.close()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- time ------------------------------------------------------------------------------

    def seconds(self, frame: av.VideoFrame) -> float:
        """Presentation time of ``frame`` in seconds from the first frame (exactly rounded)."""
        return float((frame.pts - self.origin) * self.time_base)

    def ticks(self, t: float | Fraction) -> int:
        """``t`` seconds from the first frame as the nearest tick of the stream's time base.

        Frame times are whole ticks, asked-for times are floats: the centre of segment 2 of 3 of
        a 3.6 s video is 1.7999999999999998, not frame 45's 1.8. Rounding to the nearest tick
        (half a tick of tolerance) makes "the last frame at or before t" hold on the boundary."""
        return math.floor(Fraction(t) / self.time_base + Fraction(1, 2))

    def last_pts_at(self, t: float | Fraction) -> int:
        """The largest pts shown at or before ``t`` seconds: a frame is the answer for ``t`` when
        its pts is at most this (compare once per time, not per frame, in integers)."""
        return self.origin + self.ticks(t)

    def container_seconds(self, pts: int) -> float:
        """``pts`` in seconds on the container's timeline."""
        return float(pts * self.time_base)

    def _average_fps(self) -> float:
        """Average frame rate: counted frames over the duration where the container counts them,
        else the stated rate; 0.0 when neither tells."""
        counted = self.counted_frames
        if counted and self.duration_s > 0:
            return counted / self.duration_s
        rate = self.stream.average_rate or self.stream.guessed_rate
        return float(rate) if rate else 0.0

    def _count_frames(self) -> int | None:
        """Frames listed one by one in the container (MP4/MOV sample table, AVI index), else None.

        An AVI header's frame count may count slots, not frames: Cinepak `tree.avi` says 444 at
        15 fps and codes 68 (the others are dropped slots, absent from the index)."""
        if self._has_frame_table() and self.stream.frames:
            return self.stream.frames
        if self.container.format.name == "avi" and self.has_index:
            return sum(1 for entry in self.stream.index_entries if entry.size > 0)
        return None

    def info(self) -> VideoInfo:
        stream = self.stream
        fps = self.fps
        width, height = self.first.width, self.first.height
        if self.rotation in (90, 270):
            width, height = height, width
        counted = self.counted_frames
        num_frames = counted or max(1, round(self.duration_s * fps))
        return VideoInfo(
            duration_s=self.duration_s,
            fps=fps,
            num_frames=num_frames,
            width=width,
            height=height,
            rotation=self.rotation,
            start_time_s=self.container_seconds(self.origin),
            codec=stream.codec_context.name,
            num_frames_exact=counted is not None,
        )

    # -- decoding --------------------------------------------------------------------------

    def frames_from_start(self) -> Iterator[av.VideoFrame]:
        """Every frame in presentation order, starting with the one decoded on open."""
        yield self.first
        yield from self._frames

    def seek(self, offset: int) -> av.VideoFrame | None:
        """Seek to the keyframe at or before ``offset`` (stream time base); the first frame after."""
        self._frames.close()
        try:
            self.container.seek(offset, stream=self.stream, backward=True)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(self.uri, f"cannot seek ({err})", "remux it into MP4 (faststart)") from err
        self._decode_afresh()
        return next(self._frames, None)

    def _decode_afresh(self) -> None:
        """Start decoding where the container now stands (after a seek or a reopen)."""
        self.skipped_since_seek = False
        self._last_stamp = None
        self._frames = self._decode()

    def next_frame(self) -> av.VideoFrame | None:
        return next(self._frames, None)

    def _set_skipping(self, skip: bool) -> None:
        # Non-reference frames are never needed to decode later ones, so far before a
        # requested time they are dropped by the decoder: about half the frames of typical
        # H.264 (every unreferenced B-frame), and the cheap half to skip.
        if skip != self._skipping:
            self.stream.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"
            self._skipping = skip

    def _timestamp(self, frame: av.VideoFrame) -> int:
        """The frame's presentation time (stream ticks) under the stream's timestamp rule."""
        if self.timestamps_from_dts and frame.dts is not None:
            stamp = frame.dts
        elif self.timestamps_from_dts and self._last_stamp is not None:
            stamp = self._last_stamp + self._frame_ticks()  # the flushed last frame has no dts
        else:
            stamp = _frame_pts(frame, self.uri)
        self._last_stamp = stamp
        return stamp

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Frames in presentation order from the demuxer's position, checking the deadline."""
        previous_pts = None
        try:
            for packet in self.container.demux(self.stream):
                self.deadline.check()
                self._set_skipping(self.skip_before is not None and packet.pts is not None
                                   and packet.pts < self.skip_before)
                self.skipped_since_seek |= self._skipping
                for frame in packet.decode():
                    self.deadline.check()
                    frame.pts = self._timestamp(frame)
                    previous_pts = frame.pts
                    self.decoded_frames += 1
                    yield frame
        except (av.error.FFmpegError, OSError) as err:  # OSError: a remote read failed
            reason, hint = _explain(err)
            where = f" after {self.container_seconds(previous_pts):.3f}s" if previous_pts is not None else ""
            raise VideoDecodeError(self.uri, f"{reason}{where}", hint) from err


class _SparseCursor:
    """Answers "the frame at time t" for a rising sequence of times, seeking only when it pays.

    It holds ``current`` (the last decoded frame at or before the previous time) and ``ahead``
    (the next decoded frame, or None at the end of the stream).
    """

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.current: av.VideoFrame | None = None
        self.ahead: av.VideoFrame | None = reader.first
        self._keyframes: list[int] | None = None
        self.skip_allowed = True

    def frame_at(self, t: float) -> av.VideoFrame:
        reader = self.reader
        # Frames more than _SKIP_MARGIN_FRAMES frame intervals before t cannot be the answer
        # when the frame rate holds, so their non-reference frames are not decoded at all.
        skip = self.skip_allowed and reader.fps > 0
        skip_before = reader.origin + math.floor((t - _SKIP_MARGIN_FRAMES / max(reader.fps, 1e-3))
                                                 / reader.time_base)
        reader.skip_before = skip_before if skip else None
        try:
            held = self._step_to(t)
        finally:
            reader.skip_before = None
        if skip and reader.skipped_since_seek and held.pts < skip_before:
            # A gap in the frame rate: a skipped frame may have been the answer. Decode the
            # stretch again without skipping (exact, and rare: variable frame rate only).
            self.skip_allowed = False
            self._seek(t)
            held = self._step_to(t)
            self.skip_allowed = True
        return held

    def _step_to(self, t: float) -> av.VideoFrame:
        if self._must_seek(t):
            self._seek(t)
        limit = self.reader.last_pts_at(t)
        while self.ahead is not None and self.ahead.pts <= limit:
            self.current, self.ahead = self.ahead, self.reader.next_frame()
        held = self.current if self.current is not None else self.ahead
        assert held is not None  # _seek guarantees a frame
        return held

    def _must_seek(self, t: float) -> bool:
        reader = self.reader
        limit = reader.last_pts_at(t)
        earliest = self.current if self.current is not None else self.ahead
        if earliest is None or (earliest.pts > limit and earliest.pts > reader.origin):
            return True  # the frame for t lies before what we hold (times went backwards)
        if self.ahead is None or self.ahead.pts > limit:
            return False  # the answer is already held
        keyframe = self._keyframe_at_or_before(t)
        if keyframe is not None:
            # Decoding on from `ahead` passes through keyframe; a seek starts right at it.
            return keyframe > self.ahead.pts
        return t - reader.seconds(self.ahead) > _BLIND_SEEK_GAP_S

    def _seek(self, t: float) -> None:
        """Seek so that the first decoded frame is at or before ``t`` (or is the stream's first)."""
        reader = self.reader
        keyframe = self._keyframe_at_or_before(t)
        target = reader.origin + math.floor(t / reader.time_base)
        offset = keyframe if keyframe is not None else target
        backoff = _FIRST_BACKOFF_S
        while True:
            if offset <= reader.origin:
                first = reader.restart(reader.origin)  # the very start, exactly
                break
            first = reader.seek(offset)
            if first is not None and first.pts <= reader.last_pts_at(t):
                break
            # The demuxer landed past t (no exact index, or B-frame reordering): step back.
            offset = min(offset - 1, target - math.ceil(backoff / reader.time_base))
            backoff *= 2
        self.current, self.ahead = None, first

    def _keyframe_at_or_before(self, t: float) -> int | None:
        """pts of the last keyframe at or before t, estimated from the index."""
        offsets = self._keyframe_index()
        position = bisect.bisect_right(offsets, self.reader.last_pts_at(t)) - 1
        return offsets[position] if position >= 0 else None

    def _keyframe_index(self) -> list[int]:
        if self._keyframes is None:
            self._keyframes = self._read_keyframe_index()
        return self._keyframes

    def _read_keyframe_index(self) -> list[int]:
        reader = self.reader
        if not reader.has_index:
            return []
        stamps = [e.timestamp for e in reader.stream.index_entries if e.is_keyframe and not e.is_discard]
        if not stamps:
            return []
        # MP4 indexes decode timestamps, but seeks by presentation time; with B-frames the two
        # differ by a constant delay, visible at the first keyframe (its pts is the first pts).
        shift = max(reader.origin - stamps[0], 0)
        return [s + shift for s in stamps]


class _Converter:
    """VideoFrame -> uint8 [H, W, 3] RGB, upright, optionally scaled and centre-cropped."""

    def __init__(self, reader: _Reader, size: int | None, crop: bool) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size must be a positive int or None, got {size}")
        self.quarter_turns = reader.rotation // 90
        stored_w, stored_h = reader.first.width, reader.first.height
        upright_w, upright_h = (stored_h, stored_w) if self.quarter_turns % 2 else (stored_w, stored_h)
        if size is not None:
            # round() lands the shorter side on exactly `size`; max() guards the longer one.
            scale = size / min(upright_w, upright_h)
            upright_w, upright_h = max(size, round(upright_w * scale)), max(size, round(upright_h * scale))
        self.crop = size if (size is not None and crop) else None
        # swscale resizes the stored (unrotated) frame, so swap the target back for 90/270.
        self.width, self.height = (upright_h, upright_w) if self.quarter_turns % 2 else (upright_w, upright_h)
        # One reformatter keeps its swscale context: 3-4x faster than frame.to_ndarray(width=...),
        # which builds a new one per frame.
        self._reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        # Always give the size: a stream that changes resolution mid-way still stacks.
        rgb = self._reformatter.reformat(frame, width=self.width, height=self.height, format="rgb24")
        image = rgb.to_ndarray()
        if self.quarter_turns:
            # rotation is clockwise; np.rot90 turns counter-clockwise for positive k.
            image = np.rot90(image, k=-self.quarter_turns)
        if self.crop is not None:
            top = (image.shape[0] - self.crop) // 2
            left = (image.shape[1] - self.crop) // 2
            image = image[top : top + self.crop, left : left + self.crop]
        return np.ascontiguousarray(image)


def _frame_pts(frame: av.VideoFrame, uri: str) -> int:
    if frame.pts is not None:
        return frame.pts
    if frame.dts is not None:
        return frame.dts
    raise VideoDecodeError(
        uri,
        "frames carry no timestamps (a raw elementary stream?)",
        "remux it into MP4 or MKV, e.g. `ffmpeg -i in.h264 -c copy out.mp4`",
    )


def _explain(err: BaseException) -> tuple[str, str]:
    """A short reason and a fix for an FFmpeg / OS error."""
    if isinstance(err, FileNotFoundError):
        return "no such file", "check the path"
    if isinstance(err, PermissionError):
        return "permission denied", "check the file's permissions"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not a video file", "pass the path of a video file"
    if isinstance(err, av.error.InvalidDataError):
        return (
            "invalid or truncated video data (FFmpeg: invalid data found)",
            "the file is corrupt, cut short or not a video; re-download or re-encode it",
        )
    if isinstance(err, av.error.DecoderNotFoundError):
        return "no decoder for this codec in the installed FFmpeg", "re-encode it to H.264"
    return f"cannot read it ({type(err).__name__}: {err})", ""


def _describe(source: Source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)
