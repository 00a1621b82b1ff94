"""The synthetic video-caption corpus behind ``vidray synth``: real H.264 MP4s, deterministic per seed.

Each video shows 1-3 coloured shapes (circle, square, triangle, star, cross in one of eight named
colours) over a dark background whose colour drifts slowly. The video is cut into several
*events*; in each event every shape moves in a straight line in its own direction (left, right,
up or down), starting from a fresh position (an event boundary is a cut). An event's caption
names what is drawn: "a red circle moves left and a blue square moves up". Colour and shape are
visible in one frame; the direction needs two, so temporal modelling matters.

What lands under ``OUT`` (a local path or an ``s3://`` URI):

- ``videos/<video_id>.mp4``  libx264, yuv420p, 24/25/30 fps, 160x120 ... 320x240, 1-3 s events.
- ``manifest.parquet``       one row per video (see :mod:`vidray.data.manifest`); ``captions`` are the
  timestamped events (HowTo100M-like). ``duration_s`` is exactly ``frames / fps``.
- ``qa.jsonl``               open-ended QA, one-word answers: ``{"video", "question", "answer",
  "type", "start", "end"}``, e.g. "what colour is the shape moving up?" -> "red"; ``type`` is
  what the answer names (colour, kind, direction): direction questions need temporal modelling.
- ``mc.jsonl``               multiple choice: ``{"video", "question", "options": [5 captions],
  "answer": index, "start", "end"}``; the wrong options differ from the truth in one colour,
  shape or direction.
- ``coin.json``              action segmentation in the COIN annotation format (COIN.json):
  ``{"database": {video_id: {"subset", "duration", "annotation": [{"id", "label",
  "segment": [start, end]}]}}}``, one annotation per event with the event's caption times.
  ``label`` is ``"moves <direction>"`` of the event's first shape (direction needs temporal
  modelling; colour and shape would not); ``id`` is the label's step id (``"1"``-``"4"``, the
  direction's position in ``DIRECTIONS``), shared by every segment with that label as COIN's
  step ids are. ``subset`` is ``"training"``/``"validation"``/``"testing"`` for our
  train/val/test (COIN itself has only training and testing).

Shapes stay inside the frame's centred square, so the frames models' preprocessing (shorter side
resized, centre crop) never cuts one off.

Short single-caption clips (MSR-VTT-like) are not separate files: **every event is a clip**, the
segment ``[start, end)`` of its video with the event's caption as its one sentence. QA and MC rows
are about one event too, so they carry the same ``start``/``end``; inside one event the shapes
move in distinct directions, so "the shape moving up" is never ambiguous there.

Event ``k`` covers frames ``[f_k, f_{k+1})``; its caption has ``start = f_k / fps`` and
``end = f_{k+1} / fps`` (the next event's start), so the frame for time ``t`` (the last frame whose
presentation time is ``<= t``) of any ``t`` in ``[start, end)`` belongs to the event.

Two styles (``SynthConfig.style``). ``clean`` is all of the above: the small, exactly captioned
downstream set (MSR-VTT / YouCook2-like). ``asr`` is a pre-training corpus of the same visual world
(same planner, same renderer) captioned the way HowTo100M's ASR is (:func:`asr_captions`):

- every event is still spoken, but with filler words around it (``"so um"``, ``"okay now"``,
  ``"you can see"``, ``"right"``), lower case without commas, sometimes with one word dropped or
  said twice; between events, lines of unrelated chatter (``"thanks for watching"``) that describe
  nothing on screen. The words are the clean captions' words plus ``FILLER_WORDS``.
- caption times are loose: each end moves by up to ``ASR_JITTER_S`` (1 s) either way, clamped to
  ``[0, duration]`` with ``end > start``, so consecutive captions may overlap or leave gaps.
  Captions are sorted by start time.
- no ``qa.jsonl``, ``mc.jsonl`` or ``coin.json`` (the summary counts 0 and ``coin_uri`` is None);
  every video is in the ``train`` split (``val_fraction`` and ``test_fraction`` are ignored).
- video ids are ``asr-synth_<index>``, never equal to a clean corpus's ``synth_<index>``, so both
  corpora can sit side by side; plans come from ``rng([seed, index, ASR_PLAN_STREAM])``, so the
  asr corpus of seed S holds other videos than the clean corpus of seed S (or of any other seed
  below 2^32): the downstream test videos are never seen in pre-training.

Determinism: a clean video's content comes only from ``np.random.default_rng([seed, index])`` (its
QA and split from sibling streams; an asr video's from ``[seed, index, ASR_PLAN_STREAM]``, its
captions from ``ASR_TEXT_STREAM``), x264 runs with one thread and fixed options, and every output
is sorted by ``video_id``. The same seed therefore gives byte-identical MP4s and manifests,
whatever the worker count or completion order (with the same numpy and PyAV/FFmpeg builds: numpy
does not promise the same random streams, nor x264 the same bitstream, across versions).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import av
import numpy as np
from tqdm import tqdm

from vidray import config, storage
from vidray.config import ConfigError, option
from vidray.data import manifest

# Plain names a tokenizer knows; saturated colours far apart in RGB and far from the dark
# background, so compression and chroma subsampling never make one look like another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 230, 50),
    "green": (40, 190, 60),
    "cyan": (40, 215, 225),
    "blue": (40, 80, 235),
    "purple": (155, 60, 205),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Unit step (dx, dy) in image coordinates: y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FPS_CHOICES = (24, 25, 30)
FRAME_SIZES = ((160, 120), (192, 144), (224, 168), (256, 192), (320, 240))  # (width, height), even
EVENT_SECONDS = (1.0, 3.0)        # length of an event; the last one is 1-2 s (or the whole video)
SHAPE_FRACTION = (0.22, 0.32)     # shape size as a fraction of the frame's shorter side
TRAVEL_FRACTION = (0.35, 0.65)    # distance moved in one event, as a fraction of the free room
BACKGROUND_RANGE = (10, 70)       # background channels stay dark
PLACEMENT_TRIES = 256             # random placements tried before accepting overlapping paths
# One thread and fixed options: x264 output then depends only on the frames. mbtree=0: with the
# macroblock-tree rate control on, this x264 build (core 165, SIMD on an AVX-512 CPU) gave some
# videos different bytes depending on what the process had encoded before (the same frames went
# in); without it (or with asm=0, 3x slower) the bytes repeat. Compression barely matters here.
X264_OPTIONS = {"preset": "veryfast", "crf": "23", "x264-params": "mbtree=0"}
KEYFRAME_SECONDS = 2              # a keyframe every 2 s, like real footage, so seeking matters
SPLIT_STREAM, QA_STREAM, MC_STREAM = 1, 2, 3  # sibling random streams: rng([seed, index, stream])
# The asr style's plan and caption streams. Never 0: numpy pads a short seed list with zeros, so
# rng([seed, index, 0]) would be rng([seed, index]), the clean video's plan.
ASR_PLAN_STREAM, ASR_TEXT_STREAM = 4, 5
# (question, which word answers it); directions are distinct within an event, so each is unambiguous.
QA_TEMPLATES = (
    ("what colour is the shape moving {direction}?", "colour"),
    ("what shape is moving {direction}?", "kind"),
    ("which direction does the {colour} {kind} move?", "direction"),
)
MC_OPTIONS = 5
MC_QUESTION = "which caption describes the clip?"
# Our split -> COIN's "subset" value (COIN has training/testing; validation follows the pattern).
COIN_SUBSETS = {"train": "training", "val": "validation", "test": "testing"}
STYLES = ("clean", "asr")
ASR_ID_PREFIX = "asr-"
# HowTo100M-like ASR captions: an event's description said with fillers around it, and chatter.
# No filler or chatter line names a colour or a shape; "right" is both a filler and a direction,
# as it is in real speech.
ASR_OPENERS = ("so", "so um", "um", "uh", "okay now", "okay so", "and now", "now", "and then",
               "you can see", "so you can see", "here we have", "right so", "and um", "so now we have")
ASR_CLOSERS = ("right", "okay", "you see", "like that", "there we go", "just like that", "yeah")
ASR_CHATTER = ("thanks for watching", "do not forget to subscribe", "let me know in the comments",
               "okay let us get started", "i really like this one", "this is my favourite part",
               "so yeah", "hi everyone welcome back", "give it a try at home", "that is it for today",
               "i will be back in a second", "pretty cool")
FILLER_WORDS = frozenset(w for line in ASR_OPENERS + ASR_CLOSERS + ASR_CHATTER for w in line.split())
ASR_JITTER_S = 1.0           # each caption end moves by up to this much, either way
ASR_MIN_CAPTION_S = 0.3      # shortest caption after jittering (less on a video shorter than 0.6 s)
ASR_CLOSER_P = 0.4           # an event line ends with a filler too
ASR_DROP_P, ASR_REPEAT_P = 0.15, 0.15  # one word of an event line dropped / said twice
ASR_CHATTER_P = 0.35         # a chatter line after an event (and before the first)
ASR_CHATTER_S = (1.0, 2.5)   # a chatter line's length


@dataclass
class SynthConfig:
    """How many synthetic videos to make, how long, and how to split them."""

    videos: int = option(24, "number of videos", ge=1)
    seed: int = option(0, "random seed; the same seed gives byte-identical output", ge=0)
    min_seconds: float = option(4.0, "shortest video duration in seconds", gt=0)
    max_seconds: float = option(12.0, "longest video duration in seconds", gt=0)
    workers: Optional[int] = option(None, "encoding processes (null: one per CPU)", ge=1)
    val_fraction: float = option(0.1, "fraction of videos in the val split", ge=0, le=1)
    test_fraction: float = option(0.2, "fraction of videos in the test split", ge=0, le=1)
    style: Literal["clean", "asr"] = option(
        "clean", "clean: the exactly captioned downstream set with splits, QA, MC and COIN files; asr: "
        "a HowTo100M-like pre-training corpus of other videos (ids asr-*), loosely timed captions "
        "with filler words and chatter, all videos in train (val/test fractions ignored), no QA/MC/COIN")

    def validate(self) -> None:
        """Cross-field checks; raises :class:`ConfigError` naming the key to change."""
        if self.min_seconds > self.max_seconds:
            raise ConfigError("min_seconds", f"must be <= max_seconds ({self.max_seconds}), "
                                             f"got {self.min_seconds}")
        if self.val_fraction + self.test_fraction > 1:
            raise ConfigError("test_fraction", f"val_fraction + test_fraction must be <= 1, got "
                                               f"{self.val_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class Shape:
    """One shape of a video: the same colour, kind and size in every event."""

    colour: str
    kind: str
    size: int  # side of its square bounding box, pixels


@dataclass(frozen=True)
class Motion:
    """A shape moving in a straight line during one event; positions are bounding-box top-left."""

    shape: int
    direction: str
    start: tuple[int, int]
    end: tuple[int, int]


@dataclass(frozen=True)
class Event:
    """Frames ``[first_frame, end_frame)`` in which every shape makes one :class:`Motion`."""

    first_frame: int
    end_frame: int
    motions: tuple[Motion, ...]


@dataclass(frozen=True)
class VideoPlan:
    """Everything needed to render one video; cheap to make, so the parent makes all of them."""

    video_id: str
    index: int
    fps: int
    width: int
    height: int
    frames: int
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # first and last frame's colour
    shapes: tuple[Shape, ...]
    events: tuple[Event, ...]

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


@dataclass
class SynthSummary:
    """What :func:`synthesize` wrote."""

    out: str
    manifest_uri: str
    coin_uri: Optional[str]  # action segments (COIN format); None for the asr style
    videos: int
    clips: int          # captions in the manifest (clean: events = captioned clips; asr: + chatter)
    qa: int
    mc: int
    frames: int
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# --- planning: all randomness lives here ------------------------------------------------------


def video_id(index: int, style: str = "clean") -> str:
    """``synth_000042``; ``asr-synth_000042`` in the asr style."""
    return (ASR_ID_PREFIX if style == "asr" else "") + f"synth_{index:06d}"


def _plan_rng(seed: int, index: int, style: str) -> np.random.Generator:
    if style == "clean":
        return np.random.default_rng([seed, index])
    if style == "asr":
        return np.random.default_rng([seed, index, ASR_PLAN_STREAM])
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def plan_video(seed: int, index: int, min_seconds: float, max_seconds: float,
               style: str = "clean") -> VideoPlan:
    """The content of video ``index``, drawn from ``np.random.default_rng([seed, index])`` only
    (``[seed, index, ASR_PLAN_STREAM]`` in the asr style: other videos than the clean ones)."""
    rng = _plan_rng(seed, index, style)
    fps = int(rng.choice(FPS_CHOICES))
    width, height = FRAME_SIZES[int(rng.integers(len(FRAME_SIZES)))]
    # At least two frames: a direction needs two.
    frames = max(2, round(rng.uniform(min_seconds, max_seconds) * fps))
    background = (_dark_colour(rng), _dark_colour(rng))
    shapes = _draw_shapes(rng, min(width, height))
    events = tuple(_draw_event(rng, shapes, first, end, width, height)
                   for first, end in _event_bounds(rng, frames, fps))
    return VideoPlan(video_id(index, style), index, fps, width, height, frames, background, shapes,
                     events)


def _dark_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    lo, hi = BACKGROUND_RANGE
    return tuple(int(c) for c in rng.integers(lo, hi + 1, size=3))


def _draw_shapes(rng: np.random.Generator, short_side: int) -> tuple[Shape, ...]:
    """1-3 shapes with distinct colours and distinct kinds, so a caption names each uniquely."""
    count = int(rng.integers(1, 4))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    kinds = rng.choice(SHAPES, size=count, replace=False)
    sizes = rng.uniform(*SHAPE_FRACTION, size=count) * short_side
    return tuple(Shape(str(c), str(k), int(round(s))) for c, k, s in zip(colours, kinds, sizes))


def _event_bounds(rng: np.random.Generator, frames: int, fps: int) -> list[tuple[int, int]]:
    """Cut ``[0, frames)`` into events of EVENT_SECONDS each (one event if the video is shorter)."""
    shortest = max(2, round(EVENT_SECONDS[0] * fps))
    longest = max(shortest, round(EVENT_SECONDS[1] * fps))
    cuts = [0]
    # Cut only while what is left can hold this event and one more of the shortest length.
    while frames - cuts[-1] >= 2 * shortest:
        step = int(rng.integers(shortest, longest + 1))
        cuts.append(min(cuts[-1] + step, frames - shortest))
    cuts.append(frames)
    return list(zip(cuts[:-1], cuts[1:]))


def _draw_event(rng: np.random.Generator, shapes: tuple[Shape, ...], first: int, end: int,
                width: int, height: int) -> Event:
    """Distinct directions per shape; placements whose paths never touch, when one can be found."""
    directions = [str(d) for d in rng.choice(list(DIRECTIONS), size=len(shapes), replace=False)]
    motions: tuple[Motion, ...] = ()
    for _ in range(PLACEMENT_TRIES):
        motions = tuple(_draw_motion(rng, i, shape, d, width, height)
                        for i, (shape, d) in enumerate(zip(shapes, directions)))
        if not _paths_touch(motions, shapes):
            break
    return Event(first, end, motions)


def _draw_motion(rng: np.random.Generator, index: int, shape: Shape, direction: str,
                 width: int, height: int) -> Motion:
    # Shapes stay inside the centred square: the frames models resize the shorter side and
    # centre-crop, which would otherwise cut off shapes near the sides of a 4:3 frame.
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    dx, dy = DIRECTIONS[direction]
    room = side - shape.size
    travel = rng.uniform(*TRAVEL_FRACTION) * room
    start = []
    for step, offset in ((dx, left), (dy, top)):
        if step > 0:
            start.append(offset + rng.uniform(0, room - travel))
        elif step < 0:
            start.append(offset + rng.uniform(travel, room))
        else:
            start.append(offset + rng.uniform(0, room))
    x0, y0 = start
    x1, y1 = x0 + dx * travel, y0 + dy * travel
    return Motion(index, direction, (round(x0), round(y0)), (round(x1), round(y1)))


def _paths_touch(motions: tuple[Motion, ...], shapes: tuple[Shape, ...], margin: int = 2) -> bool:
    """Whether two bounding boxes come within ``margin`` pixels at any of 17 instants."""
    if len(motions) < 2:
        return False
    t = np.linspace(0.0, 1.0, 17)[:, None]                       # [instants, 1]
    start = np.array([m.start for m in motions], dtype=np.float64)  # [shapes, 2]
    end = np.array([m.end for m in motions], dtype=np.float64)
    low = start[None] + (end - start)[None] * t[..., None]        # [instants, shapes, 2]
    high = low + np.array([shapes[m.shape].size for m in motions])[None, :, None]
    # Boxes i and j touch when their intervals overlap on both axes at the same instant.
    overlap = (low[:, :, None] < high[:, None] + margin) & (low[:, None] < high[:, :, None] + margin)
    touching = overlap.all(axis=-1)                                # [instants, shapes, shapes]
    touching[:, np.arange(len(motions)), np.arange(len(motions))] = False
    return bool(touching.any())


def _position(motion: Motion, t: float) -> tuple[int, int]:
    """Top-left corner at fraction ``t`` in [0, 1] of the event."""
    (x0, y0), (x1, y1) = motion.start, motion.end
    return round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)


# --- captions, QA and multiple choice ---------------------------------------------------------


def describe_motion(colour: str, kind: str, direction: str) -> str:
    """``"a red circle moves left"`` (``"an orange ..."`` before a vowel)."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {kind} moves {direction}"


def caption_text(parts: list[tuple[str, str, str]]) -> str:
    """Join (colour, kind, direction) triples: "a, b and c"."""
    phrases = [describe_motion(*p) for p in parts]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def event_parts(plan: VideoPlan, event: Event) -> list[tuple[str, str, str]]:
    """(colour, kind, direction) of every motion in ``event``, in shape order."""
    return [(plan.shapes[m.shape].colour, plan.shapes[m.shape].kind, m.direction)
            for m in event.motions]


def event_span(plan: VideoPlan, event: Event) -> tuple[float, float]:
    return event.first_frame / plan.fps, event.end_frame / plan.fps


def captions(plan: VideoPlan) -> list[dict]:
    """The manifest's timestamped captions: one per event."""
    out = []
    for event in plan.events:
        start, end = event_span(plan, event)
        out.append({"start": start, "end": end, "text": caption_text(event_parts(plan, event))})
    return out


def asr_captions(plan: VideoPlan, seed: int) -> list[dict]:
    """HowTo100M-like ASR captions of ``plan``, from ``rng([seed, index, ASR_TEXT_STREAM])`` only.

    One line per event (its description with fillers, maybe a word dropped or repeated) and, with
    probability ``ASR_CHATTER_P`` before the first event and after each, a chatter line about
    nothing on screen. Times are jittered by up to ``ASR_JITTER_S``, kept in ``[0, duration]``
    with ``end - start >= min(ASR_MIN_CAPTION_S, duration / 2)``, and given in centiseconds;
    the lines are sorted by (start, end).
    """
    rng = np.random.default_rng([seed, plan.index, ASR_TEXT_STREAM])
    duration_cs = math.floor(plan.duration_s * 100)
    shortest_cs = max(1, min(round(ASR_MIN_CAPTION_S * 100), duration_cs // 2))
    jitter_cs = round(ASR_JITTER_S * 100)

    def timed(start: float, end: float, text: str) -> dict:
        lo = round(start * 100) + int(rng.integers(-jitter_cs, jitter_cs + 1))
        hi = round(end * 100) + int(rng.integers(-jitter_cs, jitter_cs + 1))
        lo = min(max(lo, 0), duration_cs - shortest_cs)
        hi = min(max(hi, lo + shortest_cs), duration_cs)
        return {"start": lo / 100, "end": hi / 100, "text": text}

    def chatter(at: float) -> dict:
        length = rng.uniform(*ASR_CHATTER_S)
        return timed(at, at + length, str(rng.choice(ASR_CHATTER)))

    out = []
    if rng.random() < ASR_CHATTER_P:
        out.append(chatter(0.0))
    for event in plan.events:
        start, end = event_span(plan, event)
        out.append(timed(start, end, _spoken(rng, caption_text(event_parts(plan, event)))))
        if rng.random() < ASR_CHATTER_P:
            out.append(chatter(end))
    return sorted(out, key=lambda c: (c["start"], c["end"]))


def _spoken(rng: np.random.Generator, description: str) -> str:
    """``description`` as speech: lower case, no commas, an opener, maybe a closer, maybe one word
    dropped or said twice."""
    words = description.replace(",", "").split()
    roll = rng.random()
    if roll < ASR_DROP_P and len(words) > 2:
        del words[int(rng.integers(len(words)))]
    elif roll < ASR_DROP_P + ASR_REPEAT_P:
        i = int(rng.integers(len(words)))
        words.insert(i, words[i])
    words = str(rng.choice(ASR_OPENERS)).split() + words
    if rng.random() < ASR_CLOSER_P:
        words += str(rng.choice(ASR_CLOSERS)).split()
    return " ".join(words)


def qa_rows(plan: VideoPlan, seed: int) -> list[dict]:
    """One question of each template per event, about a randomly chosen shape of that event."""
    rng = np.random.default_rng([seed, plan.index, QA_STREAM])
    rows = []
    for event in plan.events:
        start, end = event_span(plan, event)
        parts = event_parts(plan, event)
        for template, answer_key in QA_TEMPLATES:
            colour, kind, direction = parts[int(rng.integers(len(parts)))]
            words = {"colour": colour, "kind": kind, "direction": direction}
            rows.append({"video": plan.video_id, "question": template.format(**words),
                         "answer": words[answer_key], "type": answer_key, "start": start, "end": end})
    return rows


def mc_rows(plan: VideoPlan, seed: int) -> list[dict]:
    """One five-way caption choice per event; wrong options are near misses of the true caption."""
    rng = np.random.default_rng([seed, plan.index, MC_STREAM])
    rows = []
    for event in plan.events:
        start, end = event_span(plan, event)
        parts = event_parts(plan, event)
        truth = caption_text(parts)
        options = [truth]
        while len(options) < MC_OPTIONS:
            wrong = caption_text(_near_miss(rng, parts))
            if wrong not in options:
                options.append(wrong)
        order = rng.permutation(MC_OPTIONS)
        options = [options[i] for i in order]
        rows.append({"video": plan.video_id, "question": MC_QUESTION, "options": options,
                     "answer": options.index(truth), "start": start, "end": end})
    return rows


def _near_miss(rng: np.random.Generator, parts: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``parts`` with one colour, kind or direction changed to one no other shape uses."""
    parts = [list(p) for p in parts]
    target = parts[int(rng.integers(len(parts)))]
    slot = int(rng.integers(3))
    vocabulary = (list(COLOURS), list(SHAPES), list(DIRECTIONS))[slot]
    used = {p[slot] for p in parts}
    target[slot] = str(rng.choice([w for w in vocabulary if w not in used]))
    return [tuple(p) for p in parts]


def action_label(event: Event) -> str:
    """The event's action-segmentation label: ``"moves <direction>"`` of its first shape."""
    return f"moves {event.motions[0].direction}"


def coin_entry(plan: VideoPlan, split: str) -> dict:
    """One video's ``database`` entry of ``coin.json``: one annotation per event, in time order."""
    annotations = []
    for event in plan.events:
        start, end = event_span(plan, event)
        # COIN's "id" is the step id, equal for equal labels, so it follows from the direction.
        step_id = list(DIRECTIONS).index(event.motions[0].direction) + 1
        annotations.append({"id": str(step_id), "label": action_label(event), "segment": [start, end]})
    return {"subset": COIN_SUBSETS[split], "duration": plan.duration_s, "annotation": annotations}


def coin_json(plans: list[VideoPlan], splits: list[str]) -> bytes:
    """``coin.json``'s bytes; sorted keys and no run-dependent values, so the same seed gives the
    same bytes."""
    database = {plan.video_id: coin_entry(plan, split) for plan, split in zip(plans, splits)}
    return (json.dumps({"database": database}, sort_keys=True) + "\n").encode()


def assign_splits(cfg: SynthConfig) -> list[str]:
    """Split of each video index: exact counts, chosen by per-video random keys (seed-stable).
    The asr style puts every video in train."""
    if cfg.style == "asr":
        return ["train"] * cfg.videos
    keys = [np.random.default_rng([cfg.seed, i, SPLIT_STREAM]).random() for i in range(cfg.videos)]
    n_test = math.floor(cfg.videos * cfg.test_fraction + 0.5)
    n_val = min(math.floor(cfg.videos * cfg.val_fraction + 0.5), cfg.videos - n_test)
    splits = ["train"] * cfg.videos
    for rank, i in enumerate(np.argsort(keys, kind="stable")):
        if rank < n_test:
            splits[i] = "test"
        elif rank < n_test + n_val:
            splits[i] = "val"
    return splits


# --- rendering and encoding -------------------------------------------------------------------


def shape_mask(kind: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of ``kind`` filling its box (coordinates in [-1, 1])."""
    centres = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(centres, centres)
    if kind == "circle":
        return x * x + y * y <= 1.0
    if kind == "square":
        return np.ones((size, size), dtype=bool)
    if kind == "triangle":  # apex up, base along the bottom edge
        return np.abs(x) <= (y + 1) / 2
    if kind == "cross":
        return (np.abs(x) <= 0.34) | (np.abs(y) <= 0.34)
    if kind == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return _inside_polygon(x, y, radii * np.cos(angles), radii * np.sin(angles) + 0.12)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def _inside_polygon(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to +x crosses the outline an odd number of times."""
    inside = np.zeros(x.shape, dtype=bool)
    for i in range(len(px)):
        xa, ya, xb, yb = px[i - 1], py[i - 1], px[i], py[i]
        if ya == yb:
            continue
        crosses = (ya > y) != (yb > y)
        x_at = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x < x_at)
    return inside


def render_frames(plan: VideoPlan) -> Iterator[np.ndarray]:
    """The video's RGB frames, ``uint8 [height, width, 3]``, in order."""
    masks = [shape_mask(s.kind, s.size) for s in plan.shapes]
    colours = [np.array(COLOURS[s.colour], dtype=np.uint8) for s in plan.shapes]
    first_bg, last_bg = (np.array(c, dtype=np.float64) for c in plan.background)
    frame = np.empty((plan.height, plan.width, 3), dtype=np.uint8)
    for event in plan.events:
        length = event.end_frame - event.first_frame
        for j in range(event.first_frame, event.end_frame):
            t_video = j / (plan.frames - 1)
            background = np.round(first_bg + (last_bg - first_bg) * t_video).astype(np.uint8)
            # One whole row broadcast over all rows: much faster than broadcasting a 3-vector.
            frame.reshape(plan.height, plan.width * 3)[:] = np.tile(background, plan.width)
            t_event = (j - event.first_frame) / max(1, length - 1)
            for motion in event.motions:
                x, y = _position(motion, t_event)
                size = plan.shapes[motion.shape].size
                frame[y:y + size, x:x + size][masks[motion.shape]] = colours[motion.shape]
            yield frame


def encode_mp4(plan: VideoPlan) -> bytes:
    """Render and encode ``plan`` as an H.264 MP4 in memory (one x264 thread: deterministic)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=plan.fps)
        stream.width, stream.height, stream.pix_fmt = plan.width, plan.height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.gop_size = KEYFRAME_SECONDS * plan.fps
        stream.codec_context.options = dict(X264_OPTIONS)
        for pts, rgb in enumerate(render_frames(plan)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def video_uri(root: str, index: int, style: str = "clean") -> str:
    return storage.join(root, "videos", f"{video_id(index, style)}.mp4")


def make_video(root: str, index: int, cfg: SynthConfig) -> VideoPlan:
    """Plan, render, encode and store video ``index`` under ``root``; returns its plan.

    The worker entry point: planning (placement retries) happens here too, so it runs in parallel.
    """
    plan = plan_video(cfg.seed, index, cfg.min_seconds, cfg.max_seconds, cfg.style)
    storage.write_bytes(video_uri(root, index, cfg.style), encode_mp4(plan))
    return plan


# --- the job ----------------------------------------------------------------------------------


def _root_uri(out: str) -> str:
    """``out`` as an absolute local path or a remote URI, so manifest URIs work from anywhere."""
    out = str(out)
    if storage.is_remote(out):
        return out.rstrip("/")
    if out.startswith("file://"):
        out = out[len("file://"):]
    return os.path.abspath(out)


def _checked(cfg: SynthConfig) -> SynthConfig:
    """Re-validate through the config loader, so a hand-built config gets the bound checks too."""
    return config.from_dict(SynthConfig, dataclasses.asdict(cfg))


def _make_all(root: str, cfg: SynthConfig, workers: int, progress: bool) -> list[VideoPlan]:
    """Make every video, in a process pool when ``workers > 1``; plans come back in index order."""
    bar = tqdm(total=cfg.videos, desc="synth", unit="video", disable=None if progress else True)  # None: on a terminal only
    plans: dict[int, VideoPlan] = {}
    try:
        if workers <= 1:
            for index in range(cfg.videos):
                plans[index] = make_video(root, index, cfg)
                bar.update()
        else:
            # 'spawn', never fork: the caller may have Ray (threads, sockets) running here.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(make_video, root, i, cfg): i for i in range(cfg.videos)}
                try:
                    for future in as_completed(futures):
                        plans[futures[future]] = future.result()  # re-raises a worker's error
                        bar.update()
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # don't encode the rest after a failure
                    raise
    finally:
        bar.close()
    return [plans[i] for i in range(cfg.videos)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def synthesize(out: str, cfg: SynthConfig, progress: bool = True) -> SynthSummary:
    """Write the synthetic corpus under ``out`` (local path or s3:// URI); see the module docstring.

    Videos go first and ``manifest.parquet`` last, so a manifest names only videos that exist.
    The asr style writes only the videos and the manifest.
    """
    started = time.perf_counter()
    cfg = _checked(cfg)
    root = _root_uri(out)
    storage.makedirs(root)
    workers = min(cfg.workers or os.cpu_count() or 1, cfg.videos)
    plans = _make_all(root, cfg, workers, progress)
    uris = [video_uri(root, p.index, cfg.style) for p in plans]

    splits = assign_splits(cfg)
    asr = cfg.style == "asr"
    rows = [{"video_id": p.video_id, "uri": uri, "split": split, "duration_s": p.duration_s,
             "fps": float(p.fps), "width": p.width, "height": p.height,
             "captions": asr_captions(p, cfg.seed) if asr else captions(p)}
            for p, uri, split in zip(plans, uris, splits)]
    qa: list[dict] = []
    mc: list[dict] = []
    coin_uri = None
    if not asr:
        qa = [row for p in plans for row in qa_rows(p, cfg.seed)]
        mc = [row for p in plans for row in mc_rows(p, cfg.seed)]
        storage.write_bytes(storage.join(root, "qa.jsonl"), _jsonl(qa))
        storage.write_bytes(storage.join(root, "mc.jsonl"), _jsonl(mc))
        coin_uri = storage.join(root, "coin.json")
        storage.write_bytes(coin_uri, coin_json(plans, splits))
    manifest_uri = storage.join(root, "manifest.parquet")
    manifest.write_manifest(manifest.manifest_table(rows), manifest_uri)
    return SynthSummary(
        out=root, manifest_uri=manifest_uri, coin_uri=coin_uri, videos=len(plans),
        clips=sum(len(r["captions"]) for r in rows), qa=len(qa), mc=len(mc),
        frames=sum(p.frames for p in plans),
        splits={s: splits.count(s) for s in manifest.SPLITS}, seconds=time.perf_counter() - started)
