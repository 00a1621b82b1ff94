"""Writers for small, awkward test videos (real encoded bytes, made with PyAV).

Every frame is different from its neighbours (a bright bar walks across a gradient) and carries
a white block in its top-left corner, so a wrong frame choice or a wrong rotation shows up as a
pixel difference. Sizes are tiny so a whole test file runs in seconds.

    path = write_video(tmp_path / "a.mp4", num_frames=48, fps=24, bframes=2, gop=12)
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Sequence

import av
import numpy as np


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 [height, width, 3]: a gradient, a bar at a position set by ``index``, a corner mark."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (x * 200 // max(width - 1, 1)).astype(np.uint8)
    image[..., 1] = (y * 200 // max(height - 1, 1)).astype(np.uint8)
    image[..., 2] = (index * 37) % 200
    bar = (index * 5) % width
    image[:, bar : bar + 4] = (255, 255, 0)
    # Top-left marker block: tells which way a rotated frame was turned.
    image[: max(height // 4, 2), : max(width // 4, 2)] = 255
    return image


def write_video(
    path: str | os.PathLike,
    *,
    num_frames: int = 48,
    fps: int = 24,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    gop: int = 12,
    bframes: int = 0,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    audio_first: bool = False,
    container_format: str | None = None,
    faststart: bool = False,
) -> str:
    """Encode ``num_frames`` pattern frames and return the path.

    ``pts`` (in ``time_base``, default ``1/fps``) sets presentation times yourself: irregular steps
    make a variable-frame-rate file, a non-zero first value a non-zero stream start time.
    ``rotation`` is the counter-clockwise display rotation stored in the container (as PyAV's
    ``set_display_rotation``): ``-90`` is a phone's "rotate 90 degrees clockwise to display".
    ``audio_first`` adds a silent AAC track as stream 0 so the video is stream 1.
    """
    path = str(path)
    time_base = time_base or Fraction(1, fps)
    pts = list(pts) if pts is not None else list(range(num_frames))
    assert len(pts) == num_frames
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(path, "w", format=container_format, options=options) as container:
        audio = _add_silent_audio(container) if audio_first else None
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        if codec == "libx264":
            # scenecut=0 keeps keyframes exactly every `gop` frames (the long-GOP test counts on it).
            stream.options = {
                "preset": "veryfast",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}",
            }
        else:
            stream.codec_context.gop_size = gop
            stream.codec_context.max_b_frames = bframes
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if audio is not None:
            _write_silence(container, audio, seconds=float(pts[-1] * time_base) + 0.5)
        for index, frame_pts in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, width, height), format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_audio_only(path: str | os.PathLike, seconds: float = 1.0) -> str:
    """A valid M4A-style MP4 with one AAC track and no video stream."""
    path = str(path)
    with av.open(path, "w", format="mp4") as container:
        _write_silence(container, _add_silent_audio(container), seconds)
    return path


def _add_silent_audio(container: av.container.OutputContainer) -> av.audio.stream.AudioStream:
    return container.add_stream("aac", rate=16000, layout="mono")


def _write_silence(container, stream, seconds: float) -> None:
    samples_per_frame = 1024
    for index in range(math.ceil(seconds * 16000 / samples_per_frame)):
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, samples_per_frame), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = 16000, index * samples_per_frame
        frame.time_base = Fraction(1, 16000)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def truncate_copy(source: str | os.PathLike, target: str | os.PathLike, fraction: float) -> str:
    """Write the first ``fraction`` of ``source``'s bytes to ``target`` (a download cut short)."""
    with open(source, "rb") as f:
        data = f.read()
    with open(target, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return str(target)


def has_bframes(path: str | os.PathLike) -> bool:
    """True if decode order differs from presentation order (packet pts not increasing)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.pts is not None]
    return any(b < a for a, b in zip(pts, pts[1:]))


def broken_videos(directory: str | os.PathLike) -> dict[str, bytes]:
    """Bytes of the bad inputs batch jobs must quarantine, plus one good video for comparison:
    ``zero_byte``, ``truncated`` (first 30% of a real MP4), ``not_a_video`` and ``good``."""
    real = write_video(os.path.join(directory, "real.mp4"), num_frames=48, fps=24)
    cut = truncate_copy(real, os.path.join(directory, "cut.mp4"), 0.3)
    return {"zero_byte": b"", "truncated": open(cut, "rb").read(),
            "not_a_video": b"this is a caption file, not a video\n" * 20, "good": open(real, "rb").read()}


# HowTo100M-style ASR captions of a 79.5 s video: the third runs past its end, the fourth starts
# after it (issue 18). (start, end, text)
OVERRUN_CAPTIONS = [(0.0, 20.0, "first"), (20.0, 40.0, "second"), (40.0, 84.0, "third runs past the end"),
                    (80.0, 84.0, "fourth starts after the end")]


def write_overrunning_video(path: str | os.PathLike) -> tuple[str, list[dict]]:
    """A 79.5 s video (2 fps, so it is quick to write) and its :data:`OVERRUN_CAPTIONS`."""
    path = write_video(path, num_frames=159, fps=2)
    return path, [{"start": s, "end": e, "text": t} for s, e, t in OVERRUN_CAPTIONS]
