"""The naive reference the video tests compare against: decode every frame, pick by timestamp.

    decoded = Decoded(path)                      # every frame, in order, times from the first
    decoded.index_at(1.8)                        # the last frame shown at or before 1.8 s
    assert_matches_reference(path, video.sample_frames(path, 8))

Times are compared in time-base ticks, with the asked-for time rounded to the nearest tick: a
float that misses a frame's exact time by rounding error (1.7999999999999998 for frame 45 of a
25 fps file) still gets that frame. ``reference`` names a second file holding the same frames with
trustworthy timestamps (a DivX packed-B-frame AVI remuxed through ``mpeg4_unpack_bframes``).
"""

from __future__ import annotations

import bisect
import math
import os
from fractions import Fraction

import av
import numpy as np

from vidray.data import video


class Decoded:
    """Every frame of a file, decoded in order: times from the first frame, upright RGB images."""

    def __init__(self, path: str | os.PathLike) -> None:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            self.time_base = stream.time_base
        first = frames[0].pts
        self.ticks = [f.pts - first for f in frames]
        self.times = [float(tick * self.time_base) for tick in self.ticks]
        # PyAV: VideoFrame.rotation is counter-clockwise; np.rot90 turns counter-clockwise too.
        self.quarter_turns = round(frames[0].rotation / 90)
        self.frames = frames

    def index_at(self, t: float | Fraction) -> int:
        """The last frame whose presentation time is <= t (the first frame if t precedes it)."""
        tick = math.floor(Fraction(t) / self.time_base + Fraction(1, 2))
        return max(bisect.bisect_right(self.ticks, tick) - 1, 0)

    def image(self, index: int, **reformat) -> np.ndarray:
        image = self.frames[index].to_ndarray(format="rgb24", **reformat)
        return np.rot90(image, k=self.quarter_turns)

    def pick(self, times) -> tuple[np.ndarray, np.ndarray]:
        indices = [self.index_at(float(t)) for t in times]
        return np.stack([self.image(i) for i in indices]), np.array([self.times[i] for i in indices])


def assert_matches_reference(path: str, result: video.SampledFrames, reference: str | None = None) -> None:
    frames, times = Decoded(reference or path).pick(result.requested)
    np.testing.assert_array_equal(result.timestamps, times)
    np.testing.assert_array_equal(result.frames, frames)


def reference_windows(path: str, fps: float, count: int, **reformat) -> np.ndarray:
    """``count`` frames at ``k / fps`` from the full decode (``reformat``: width/height)."""
    decoded = Decoded(path)
    return np.stack([decoded.image(decoded.index_at(Fraction(k) / Fraction(fps)), **reformat) for k in range(count)])
