"""Dataset adapters: the annotation formats people bring -> the vidray manifest.

    result = adapt("msrvtt", "s3://data/msrvtt/MSRVTT_data.json", "s3://data/msrvtt/videos")
    result.manifest    # pa.Table with MANIFEST_SCHEMA, one row per video
    result.problems    # [Problem(file, line, reason), ...]: malformed rows, reported and skipped
    result.qa          # qa/mc only: pa.Table with QA_SCHEMA
    write_result(result, "s3://data/msrvtt/manifest.parquet")

``ADAPTERS`` is a plain dict from format name to adapter function; nothing registers itself.
Annotation files are read through :mod:`vidray.storage`, so any URI works (local, s3://...).

Rules shared by every format
- A row that cannot be used is reported as a :class:`Problem` and left out; the rest is kept.
  ``Problem.line`` is the 1-based line of a CSV/JSONL row (a quoted multi-line CSV row: its
  first line), or the JSON path of the entry in a JSON file, e.g. ``database.abc.annotations[2]``.
  The reason ends with what was skipped: ``(row skipped)``, ``(video skipped)``,
  ``(caption skipped)`` or ``(segment skipped)``.
- A problem with the whole file (missing, not UTF-8, not JSON, missing required columns or
  keys, a bad option value) raises :class:`AdapterError` naming the file.
- A video id seen twice keeps its first row; the later one is a problem.
- Video URIs are ``<video_root>/<video id><ext>`` unless the format says otherwise. A local
  ``video_root`` is made absolute because Ray workers change directory. Ids and folder names
  must be relative paths (no leading ``/``, no ``..``), or the row is a problem.
- ``split``: formats that carry no split (webvid, howto100m, qa, mc) give every video this split
  (default ``"train"``); formats that carry one (msrvtt, youcook2) keep only the videos of this
  split (default: all of them).
- Times are seconds; numbers must be JSON numbers (not strings, not booleans), finite and >= 0.

Formats
- ``webvid``  WebVid CSV ``videoid, contentUrl, duration, page_idx, page_dir, name``; ``name``
  is the caption, ``duration`` ISO 8601 (``PT00H00M11S``) or plain seconds, may be empty.
  URI ``<video_root>/<page_dir>/<videoid><ext>`` (the folders of the WebVid download script);
  option ``layout="flat"`` gives ``<video_root>/<videoid><ext>``. One caption for the whole
  clip: start 0, end = duration when known, else start and end null.
- ``howto100m``  ``raw_caption.json`` ``{video_id: {start: [], end: [], text: []}}``. Arrays of
  unequal length: the video is a problem (the pairing is unknown). ASR segments are merged by
  :func:`merge_asr_captions`. Duration stays null (probed later).
- ``msrvtt``  ``MSRVTT_data.json`` ``videos[{video_id, split, start time, end time}]`` (split
  train/validate/test -> train/val/test; duration = end time - start time when both are numbers)
  and ``sentences[{video_id, caption}]`` -> whole-video captions (start/end null). Option
  ``test_csv=URI``: the JSFusion 1k-A test CSV (``key,vid_key,video_id,sentence``). Its videos
  become ``test`` with that one sentence as their only caption; the other official test videos
  become ``train`` (1k-A trains on everything but the 1k), so no test video leaks into training.
- ``youcook2``  ``youcookii_annotations_trainval.json``: ``database[vid]{subset, duration,
  annotations[{segment: [start, end], sentence}]}``; subset training/validation/testing ->
  train/val/test; captions keep their timestamps, in file order.
- ``qa``  JSONL ``{video, question, answer}``: open-ended; ``options`` is null; ``answer`` a
  string (an integer answer such as a count becomes its decimal string).
- ``mc``  JSONL ``{video, question, options[], answer}``: ``options`` are >= 2 distinct non-empty
  strings (stripped). ``answer`` is a JSON integer index into ``options`` (0-based; option
  ``index_base=1`` for 1-based) or the text of one option. It is normalised to the text of the
  correct option (stripped), so the index is ``options.index(answer)``. A string answer is never
  read as an index: ``"2"`` must be the text of an option.
  For qa and mc, ``video`` is a video id or file name: a trailing ``<ext>`` is dropped from the
  id. The manifest holds each referenced video once (first-seen order) with no captions.

Action segments (COIN) are labels, not a manifest, so they have their own reader rather than an
entry in ``ADAPTERS``:

    found = read_action_segments("s3://data/coin/COIN.json")   # also vidray synth's coin.json
    found.segments     # {video_id: [{"start", "end", "label"}, ...]} sorted by (start, end, label)
    found.problems     # [Problem(...)]: the same rules and JSON paths as the adapters above
    classes = label_vocabulary(found.segments)                  # {label: 0..K-1}, labels sorted
    per_second_labels(found.segments[vid], num_seconds, classes)  # int64 [num_seconds]

``COIN.json`` is ``database[vid]{subset, duration, annotation[{id, segment: [start, end],
label}]}``; subset training/validation/testing -> train/val/test (``split=`` keeps one).
``id`` (COIN's step id) is not read: classes come from :func:`label_vocabulary`, so they are
contiguous whatever the ids are. A result object (not a bare dict) carries the problems the way
:class:`AdapterResult` does, so callers report skipped entries like every adapter's.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import os
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vidray import storage
from vidray.config import ConfigError
from vidray.data.manifest import SPLITS, manifest_table, write_manifest

QA_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),  # null for open-ended questions
        ("answer", pa.string()),  # mc: the text of the correct option
    ]
)


class AdapterError(ValueError):
    """A whole annotation file (or an adapter option) is unusable; the message names it."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One skipped row: ``line`` is a 1-based CSV/JSONL line or a JSON path."""

    file: str
    line: int | str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclasses.dataclass
class AdapterResult:
    """What an adapter produced: the manifest, the skipped rows and, for qa/mc, the questions."""

    manifest: pa.Table
    problems: list[Problem]
    qa: pa.Table | None = None


class _Skip(Exception):
    """Raised while reading one row: the row is reported with this reason and left out.

    ``field`` names the offending field where the reported JSON path should point at it.
    """

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.field = field


class _Report:
    """Collects the problems of one adapter run."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, file: str, where: int | str, reason: str, skipped: str) -> None:
        self.problems.append(Problem(file, where, f"{reason} ({skipped} skipped)"))


class _UniqueIds:
    """Remembers where each video id was first seen, so a repeat is reported with that place."""

    def __init__(self) -> None:
        self.first_seen: dict[str, int | str] = {}

    def claim(self, video_id: str, where: int | str) -> None:
        if video_id in self.first_seen:
            raise _Skip(f"duplicate video id {video_id!r}, first seen at {self.first_seen[video_id]}")
        self.first_seen[video_id] = where


# ----------------------------------------------------------------------------- field checks


def _text(value: Any, what: str) -> str:
    """A non-empty string, stripped."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Skip(f"{what} is missing")
    if not isinstance(value, str):
        raise _Skip(f"{what} must be a string, got {type(value).__name__}")
    return value.strip()


def _seconds(value: Any, what: str) -> float:
    """A finite JSON number >= 0 (booleans and numeric strings are wrong types)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Skip(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _Skip(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _path_part(value: Any, what: str) -> str:
    """An id or folder name that is safe to join under the video root."""
    part = _text(value, what)
    # os.path.join drops the root before an absolute part, and '..' escapes it.
    if part.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", part) or "://" in part:
        raise _Skip(f"{what} {part!r} must be a relative name (no leading '/', no '..')")
    return part


_ISO_DURATION = re.compile(
    r"P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?"
)


def _parse_duration(text: str) -> float:
    """Seconds from an ISO 8601 duration (``PT00H00M11S``) or a plain number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        match = _ISO_DURATION.fullmatch(text.strip().upper())
        if not match or not any(match.groupdict().values()) or text.strip().upper().endswith("T"):
            raise _Skip(f"duration {text!r} is not an ISO 8601 duration like 'PT00H00M11S'") from None
        parts = {k: float(v or 0) for k, v in match.groupdict().items()}
        seconds = parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise _Skip(f"duration {text!r} must be a finite number of seconds >= 0")
    return seconds


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(parent: str, key: str) -> str:
    """JSON path of ``parent[key]``: ``parent.key``, or ``parent["k.e y"]`` for unusual keys."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key)}]"


# ----------------------------------------------------------------------------- file readers


@contextmanager
def _open_text(uri: str) -> Iterator[io.TextIOBase]:
    """``uri`` as UTF-8 text (a BOM is dropped); a missing file is an :class:`AdapterError`."""
    try:
        raw = storage.open_uri(uri, "rb")
    except storage.StorageError as err:
        raise AdapterError(f"cannot read annotations: {err}") from err
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        try:
            yield text
        except UnicodeDecodeError as err:
            raise AdapterError(f"{uri}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def _read_json(uri: str, required: dict[str, type]) -> dict:
    """A JSON object with the ``required`` top-level keys of the given types."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except storage.StorageError as err:
        raise AdapterError(f"cannot read annotations: {err}") from err
    except UnicodeDecodeError as err:
        raise AdapterError(f"{uri}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise AdapterError(f"{uri}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    if not isinstance(data, dict):
        raise AdapterError(f"{uri}: expected a JSON object at the top level, got {type(data).__name__}")
    for key, kind in required.items():
        if not isinstance(data.get(key), kind):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise AdapterError(f"{uri}: top-level key {key!r} must be a {kind.__name__}, found {found}")
    return data


def _csv_records(uri: str, required: list[str], report: _Report) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {column: stripped value}) per CSV row; rows with a wrong field count are problems."""
    with _open_text(uri) as text:
        reader = csv.reader(text)
        try:
            header = next(reader, None)
            if not header:
                raise AdapterError(f"{uri}: empty file, expected a CSV header with columns {required}")
            columns = [name.strip() for name in header]
            missing = [name for name in required if name not in columns]
            if missing:
                raise AdapterError(f"{uri}: missing required CSV column(s) {missing}; the header has {columns}")
            while True:
                line = reader.line_num + 1  # a quoted field may span lines: report the first
                fields = next(reader, None)
                if fields is None:
                    return
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                if len(fields) != len(columns):
                    report.add(uri, line, f"expected {len(columns)} fields, found {len(fields)}", "row")
                    continue
                yield line, {name: value.strip() for name, value in zip(columns, fields)}
        except csv.Error as err:
            raise AdapterError(f"{uri}: line {reader.line_num}: malformed CSV ({err})") from err


def _jsonl_records(uri: str, report: _Report) -> Iterator[tuple[int, dict]]:
    """(line, object) per JSONL line; lines that are not JSON objects are problems."""
    with _open_text(uri) as text:
        for line_no, line in enumerate(text, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report.add(uri, line_no, f"not valid JSON ({err.msg} at column {err.colno})", "row")
                continue
            if not isinstance(record, dict):
                report.add(uri, line_no, f"expected a JSON object, got {type(record).__name__}", "row")
                continue
            yield line_no, record


def _video_root(video_root: str) -> str:
    if "://" in str(video_root):
        return str(video_root).rstrip("/")
    return os.path.abspath(video_root)


def _strip_ext(name: str, ext: str) -> str:
    return name[: -len(ext)] if ext and name.endswith(ext) and len(name) > len(ext) else name


# ----------------------------------------------------------------------------- webvid


def adapt_webvid(annotations: str, video_root: str, *, split: str | None = None, ext: str = ".mp4",
                 layout: str = "page_dir") -> AdapterResult:
    """WebVid CSV -> manifest; ``layout`` is ``"page_dir"`` (default) or ``"flat"``."""
    if layout not in ("page_dir", "flat"):
        raise AdapterError(f"webvid option layout={layout!r}: use 'page_dir' or 'flat'")
    required = ["videoid", "name"] + (["page_dir"] if layout == "page_dir" else [])
    root, report, ids, rows = _video_root(video_root), _Report(), _UniqueIds(), []
    for line, record in _csv_records(annotations, required, report):
        try:
            row = _webvid_row(record, root, ext, layout, split or "train")
            ids.claim(row["video_id"], line)
        except _Skip as skip:
            report.add(annotations, line, str(skip), "row")
            continue
        rows.append(row)
    return AdapterResult(manifest_table(rows), report.problems)


def _webvid_row(record: dict[str, str], root: str, ext: str, layout: str, split: str) -> dict:
    video_id = _path_part(record["videoid"], "videoid")
    caption = _text(record["name"], "caption (column 'name')")
    duration = _parse_duration(record["duration"]) if record.get("duration") else None
    folder = [_path_part(record["page_dir"], "page_dir")] if layout == "page_dir" else []
    return {
        "video_id": video_id,
        "uri": storage.join(root, *folder, video_id + ext),
        "split": split,
        "duration_s": duration,
        "captions": [{"start": 0.0 if duration is not None else None, "end": duration, "text": caption}],
    }


# ----------------------------------------------------------------------------- howto100m


def merge_asr_captions(captions: list[dict]) -> list[dict]:
    """Merge the repeated segments of YouTube ASR (HowTo100M ``raw_caption.json``).

    Segments are sorted by (start, end) and their text whitespace-normalised. A segment whose
    text equals that of the last kept segment with the same text, and which starts before that
    one ends (strict overlap), is merged into it: the kept end becomes the later of both ends.
    Exact duplicates (same start, end and text) are dropped, zero-length ones included.
    Different texts are never merged, even when their times overlap (rolling ASR lines are
    distinct speech), and identical texts that only touch or are apart stay separate (a phrase
    said twice).
    """
    kept: list[dict] = []
    last_with_text: dict[str, int] = {}
    for caption in sorted(captions, key=lambda c: (c["start"], c["end"])):
        text = " ".join(caption["text"].split())
        index = last_with_text.get(text)
        if index is not None:
            previous = kept[index]
            same_span = (caption["start"], caption["end"]) == (previous["start"], previous["end"])
            if same_span or caption["start"] < previous["end"]:
                previous["end"] = max(previous["end"], caption["end"])
                continue
        last_with_text[text] = len(kept)
        kept.append({"start": caption["start"], "end": caption["end"], "text": text})
    return kept


def adapt_howto100m(annotations: str, video_root: str, *, split: str | None = None,
                    ext: str = ".mp4") -> AdapterResult:
    """HowTo100M ``raw_caption.json`` -> manifest with merged, timestamped ASR captions."""
    data = _read_json(annotations, {})
    root, report, rows = _video_root(video_root), _Report(), []
    for video_id, entry in data.items():
        path = _key_path("", video_id)
        try:
            _path_part(video_id, "video id")
            segments = _howto100m_segments(entry, path, annotations, report)
        except _Skip as skip:
            report.add(annotations, path, str(skip), "video")
            continue
        rows.append({"video_id": video_id, "uri": storage.join(root, video_id + ext),
                     "split": split or "train", "captions": merge_asr_captions(segments)})
    return AdapterResult(manifest_table(rows), report.problems)


def _howto100m_segments(entry: Any, path: str, file: str, report: _Report) -> list[dict]:
    """The valid segments of one video; a bad segment is reported at ``<id>.<field>[i]``."""
    if not isinstance(entry, dict):
        raise _Skip(f"expected an object {{start, end, text}}, got {type(entry).__name__}")
    for key in ("start", "end", "text"):
        if not isinstance(entry.get(key), list):
            raise _Skip(f"{key!r} must be a list, found {type(entry.get(key)).__name__}")
    lengths = {key: len(entry[key]) for key in ("start", "end", "text")}
    if len(set(lengths.values())) != 1:
        raise _Skip(f"start/end/text have unequal lengths {lengths}")
    segments = []
    for i, (start, end, text) in enumerate(zip(entry["start"], entry["end"], entry["text"])):
        try:
            segments.append(_timed_caption(start, end, text))
        except _Skip as skip:
            report.add(file, f"{path}.{skip.field}[{i}]", str(skip), "segment")
    return segments


def _timed_caption(start: Any, end: Any, text: Any, start_name: str = "start", end_name: str = "end",
                   text_name: str = "text") -> dict:
    """A caption with times; a :class:`_Skip` names the field (``start``/``end``/``text``)."""
    start_s = _in_field("start", _seconds, start, start_name)
    end_s = _in_field("end", _seconds, end, end_name)
    if end_s < start_s:
        raise _Skip(f"{end_name} {end_s} is before {start_name} {start_s}", "end")
    return {"start": start_s, "end": end_s, "text": _in_field("text", _text, text, text_name)}


def _in_field(field: str, check: Callable[[Any, str], Any], value: Any, name: str) -> Any:
    """``check(value, name)``, with any :class:`_Skip` tagged with ``field``."""
    try:
        return check(value, name)
    except _Skip as skip:
        raise _Skip(str(skip), field) from None


# ----------------------------------------------------------------------------- msrvtt

_MSRVTT_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def adapt_msrvtt(annotations: str, video_root: str, *, split: str | None = None, ext: str = ".mp4",
                 test_csv: str | None = None) -> AdapterResult:
    """MSR-VTT ``MSRVTT_data.json`` (+ optional JSFusion 1k-A ``test_csv``) -> manifest."""
    data = _read_json(annotations, {"videos": list, "sentences": list})
    report = _Report()
    videos, skipped = _msrvtt_videos(data["videos"], _video_root(video_root), ext, annotations, report)
    for i, entry in enumerate(data["sentences"]):
        try:
            video_id, caption = _msrvtt_sentence(entry)
            if video_id not in videos:
                if video_id in skipped:
                    continue  # its video is already reported
                raise _Skip(f"video {video_id!r} is not in 'videos'")
        except _Skip as skip:
            report.add(annotations, f"sentences[{i}]", str(skip), "caption")
            continue
        videos[video_id]["captions"].append({"start": None, "end": None, "text": caption})
    if test_csv is not None:
        _apply_msrvtt_1k_test(videos, test_csv, report)
    rows = [row for row in videos.values() if split is None or row["split"] == split]
    return AdapterResult(manifest_table(rows), report.problems)


def _msrvtt_videos(entries: list, root: str, ext: str, file: str,
                   report: _Report) -> tuple[dict[str, dict], set[str]]:
    """Rows keyed by video id, and the ids of video entries that were skipped."""
    videos: dict[str, dict] = {}
    skipped: set[str] = set()
    ids = _UniqueIds()
    for i, entry in enumerate(entries):
        path = f"videos[{i}]"
        try:
            if not isinstance(entry, dict):
                raise _Skip(f"expected an object, got {type(entry).__name__}")
            video_id = _path_part(entry.get("video_id"), "video_id")
            official = entry.get("split")
            if official not in _MSRVTT_SPLITS:
                skipped.add(video_id)
                raise _Skip(f"split {official!r} is not one of {sorted(_MSRVTT_SPLITS)}")
            ids.claim(video_id, path)
        except _Skip as skip:
            report.add(file, path, str(skip), "video")
            continue
        videos[video_id] = {"video_id": video_id, "uri": storage.join(root, video_id + ext),
                            "split": _MSRVTT_SPLITS[official], "duration_s": _msrvtt_duration(entry),
                            "captions": []}
    return videos, skipped - set(videos)


def _msrvtt_sentence(entry: Any) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise _Skip(f"expected an object {{video_id, caption}}, got {type(entry).__name__}")
    return _text(entry.get("video_id"), "video_id"), _text(entry.get("caption"), "caption")


def _msrvtt_duration(entry: dict) -> float | None:
    """``end time - start time`` of the clip in its YouTube source, when both are numbers."""
    start, end = entry.get("start time"), entry.get("end time")
    numbers = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (start, end))
    return float(end - start) if numbers and end >= start else None


def _apply_msrvtt_1k_test(videos: dict[str, dict], test_csv: str, report: _Report) -> None:
    """The 1k-A protocol: the CSV's videos are the test split, one sentence each."""
    chosen: dict[str, str] = {}
    ids = _UniqueIds()
    for line, record in _csv_records(test_csv, ["video_id", "sentence"], report):
        try:
            video_id = _text(record["video_id"], "video_id")
            sentence = _text(record["sentence"], "sentence")
            if video_id not in videos:
                raise _Skip(f"video {video_id!r} is not in the MSR-VTT annotations")
            ids.claim(video_id, line)
        except _Skip as skip:
            report.add(test_csv, line, str(skip), "row")
            continue
        chosen[video_id] = sentence
    for video_id, row in videos.items():
        if video_id in chosen:
            row["split"], row["captions"] = "test", [{"start": None, "end": None, "text": chosen[video_id]}]
        elif row["split"] == "test":
            row["split"] = "train"


# ----------------------------------------------------------------------------- youcook2

_DATABASE_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


def adapt_youcook2(annotations: str, video_root: str, *, split: str | None = None,
                   ext: str = ".mp4") -> AdapterResult:
    """YouCook2 ``youcookii_annotations_trainval.json`` -> manifest with timestamped captions."""
    data = _read_json(annotations, {"database": dict})
    root, report, rows = _video_root(video_root), _Report(), []
    for video_id, entry in data["database"].items():
        path = _key_path("database", video_id)
        try:
            row = _youcook2_video(video_id, entry, path, annotations, report)
        except _Skip as skip:
            report.add(annotations, path, str(skip), "video")
            continue
        if split is None or row["split"] == split:
            rows.append({**row, "uri": storage.join(root, video_id + ext)})
    return AdapterResult(manifest_table(rows), report.problems)


def _database_entry(entry: Any, annotations_key: str) -> tuple[str, float | None, list]:
    """(split, duration, raw annotations) of one ``database`` entry of the YouCook2 / COIN
    layout: ``{subset: training|validation|testing, duration?, <annotations_key>: [...]}``."""
    if not isinstance(entry, dict):
        raise _Skip(f"expected an object, got {type(entry).__name__}")
    subset = entry.get("subset")
    if subset not in _DATABASE_SPLITS:
        raise _Skip(f"subset {subset!r} is not one of {sorted(_DATABASE_SPLITS)}")
    duration = _seconds(entry["duration"], "duration") if entry.get("duration") is not None else None
    annotations = entry.get(annotations_key, [])
    if not isinstance(annotations, list):
        raise _Skip(f"'{annotations_key}' must be a list, got {type(annotations).__name__}")
    return _DATABASE_SPLITS[subset], duration, annotations


def _parse_each(items: list, parse: Callable[[Any], dict], file: str, path: str, what: str,
                report: _Report) -> list[dict]:
    """``parse`` of every item; a bad one is reported at ``<path>[j]`` and skipped."""
    out = []
    for j, item in enumerate(items):
        try:
            out.append(parse(item))
        except _Skip as skip:
            report.add(file, f"{path}[{j}]", str(skip), what)
    return out


def _youcook2_video(video_id: str, entry: Any, path: str, file: str, report: _Report) -> dict:
    split, duration, annotations = _database_entry(entry, "annotations")
    _path_part(video_id, "video id")
    captions = _parse_each(annotations, _youcook2_caption, file, f"{path}.annotations", "caption", report)
    return {"video_id": video_id, "split": split, "duration_s": duration, "captions": captions}


def _timed_segment(annotation: Any, text_key: str) -> dict:
    """``{segment: [start, end], <text_key>: ...}`` (YouCook2 sentences, COIN labels) as a timed caption."""
    if not isinstance(annotation, dict):
        raise _Skip(f"expected an object {{segment, {text_key}}}, got {type(annotation).__name__}")
    segment = annotation.get("segment")
    if not isinstance(segment, list) or len(segment) != 2:
        raise _Skip(f"segment must be a list [start, end], got {segment!r}")
    return _timed_caption(segment[0], segment[1], annotation.get(text_key),
                          "segment start", "segment end", text_key)


def _youcook2_caption(annotation: Any) -> dict:
    return _timed_segment(annotation, "sentence")


# ----------------------------------------------------------------------------- qa / mc


def adapt_qa(annotations: str, video_root: str, *, split: str | None = None,
             ext: str = ".mp4") -> AdapterResult:
    """Open-ended QA JSONL ``{video, question, answer}`` -> manifest of its videos + qa table."""
    return _adapt_questions(annotations, video_root, split, ext, _open_answer)


def adapt_mc(annotations: str, video_root: str, *, split: str | None = None, ext: str = ".mp4",
             index_base: int = 0) -> AdapterResult:
    """Multiple-choice JSONL ``{video, question, options, answer}`` -> manifest + qa table.

    ``answer`` (an integer index counted from ``index_base``, or an option's text) becomes the
    text of the correct option.
    """
    if index_base not in (0, 1):
        raise AdapterError(f"mc option index_base={index_base!r}: use 0 or 1")
    return _adapt_questions(annotations, video_root, split, ext,
                            lambda record: _choice_answer(record, index_base))


# The multiple-choice file an evaluation reads as it is (answer: an option index; start/end: the clip).
MC_KEYS = ("video", "question", "options", "answer", "start", "end")


def read_mc_rows(uri: str, key: str = "mc") -> list[dict]:
    """The rows of a multiple-choice jsonl (``{video, question, options, answer, start, end}``,
    the synthetic corpus's mc.jsonl), checked; ``key`` is the config key named in errors."""
    if not uri:
        raise ConfigError(key, "is required: a multiple-choice jsonl of {video, question, options, answer, "
                          "start, end} (the synthetic corpus writes mc.jsonl)")
    if not storage.exists(uri):
        raise ConfigError(key, f"{uri} does not exist")
    rows = []
    for number, line in enumerate(storage.read_bytes(uri).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = set(MC_KEYS) - set(row)
        if missing:
            raise ConfigError(key, f"{uri} line {number} lacks {sorted(missing)}")
        if not 0 <= int(row["answer"]) < len(row["options"]):
            raise ConfigError(key, f"{uri} line {number}: answer {row['answer']} is not an index of its "
                              f"{len(row['options'])} options")
        rows.append(row)
    return rows


def _adapt_questions(annotations: str, video_root: str, split: str | None, ext: str,
                     read_answer: Callable[[dict], tuple[list[str] | None, str]]) -> AdapterResult:
    root, report = _video_root(video_root), _Report()
    videos: dict[str, dict] = {}
    questions: list[dict] = []
    for line, record in _jsonl_records(annotations, report):
        try:
            video_id = _strip_ext(_path_part(record.get("video"), "video"), ext)
            question = _text(record.get("question"), "question")
            options, answer = read_answer(record)
        except _Skip as skip:
            report.add(annotations, line, str(skip), "row")
            continue
        videos.setdefault(video_id, {"video_id": video_id, "uri": storage.join(root, video_id + ext),
                                     "split": split or "train"})
        questions.append({"video_id": video_id, "question": question, "options": options, "answer": answer})
    qa = pa.Table.from_pylist(questions, schema=QA_SCHEMA)
    return AdapterResult(manifest_table(list(videos.values())), report.problems, qa)


def _open_answer(record: dict) -> tuple[None, str]:
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return None, str(answer)  # counting questions give integer answers
    return None, _text(answer, "answer")


def _choice_answer(record: dict, index_base: int) -> tuple[list[str], str]:
    options = _choice_options(record.get("options"))
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer - index_base < len(options):
            raise _Skip(f"answer index {answer} is out of range for {len(options)} options "
                        f"(counted from {index_base})")
        return options, options[answer - index_base]
    text = _text(answer, "answer")
    if text not in options:
        raise _Skip(f"answer {text!r} is not one of the options (an index must be a JSON integer)")
    return options, text


def _choice_options(options: Any) -> list[str]:
    if not isinstance(options, list):
        raise _Skip(f"options must be a list of strings, got {type(options).__name__}")
    texts = [_text(option, f"options[{i}]") for i, option in enumerate(options)]
    if len(texts) < 2:
        raise _Skip(f"options must hold at least 2 choices, got {len(texts)}")
    if len(set(texts)) != len(texts):
        raise _Skip("options repeat a choice, so the answer would be ambiguous")
    return texts


# ----------------------------------------------------------------------------- action segments



@dataclasses.dataclass
class ActionSegments:
    """What :func:`read_action_segments` found: labelled segments per video, and skipped entries."""

    segments: dict[str, list[dict]]  # video id -> [{start, end, label}], sorted
    splits: dict[str, str]           # video id -> train/val/test
    durations: dict[str, float | None]  # video id -> seconds, None when the file has none
    problems: list[Problem]


def read_action_segments(uri: str, *, split: str | None = None) -> ActionSegments:
    """COIN-format action segments (``COIN.json``, or ``coin.json`` of ``vidray synth``).

    Each video keeps its valid segments sorted by (start, end, label); a malformed segment is a
    problem at ``database.<vid>.annotation[j]``, a malformed video at ``database.<vid>``. A video
    whose segments were all skipped stays, with none (every second is background). ``split``
    keeps only that split's videos. Raises :class:`AdapterError` for an unusable file or split.
    """
    if split is not None and split not in SPLITS:
        raise AdapterError(f"split {split!r} is not one of {SPLITS}")
    data = _read_json(uri, {"database": dict})
    report = _Report()
    found = ActionSegments({}, {}, {}, report.problems)
    for video_id, entry in data["database"].items():
        path = _key_path("database", video_id)
        try:
            subset, duration, annotations = _database_entry(entry, "annotation")
        except _Skip as skip:
            report.add(uri, path, str(skip), "video")
            continue
        if split is not None and subset != split:
            continue
        found.segments[video_id] = _coin_segments(annotations, path, uri, report)
        found.splits[video_id], found.durations[video_id] = subset, duration
    return found


def _coin_segments(annotations: list, path: str, file: str, report: _Report) -> list[dict]:
    """The valid segments, sorted; each bad one is reported at ``<path>.annotation[j]``."""
    segments = _parse_each(annotations, _coin_segment, file, f"{path}.annotation", "segment", report)
    return sorted(segments, key=lambda s: (s["start"], s["end"], s["label"]))


def _coin_segment(annotation: Any) -> dict:
    caption = _timed_segment(annotation, "label")
    return {"start": caption["start"], "end": caption["end"], "label": caption["text"]}


def label_vocabulary(segments_by_video: Mapping[str, list[dict]]) -> dict[str, int]:
    """Every label that occurs, sorted by name, -> 0..K-1 (the classifier's class indices).

    Sorted rather than first-seen, so the same label set gives the same classes whatever the
    order of videos or files.
    """
    labels = {segment["label"] for segments in segments_by_video.values() for segment in segments}
    return {label: index for index, label in enumerate(sorted(labels))}


def per_second_labels(segments: list[dict], num_seconds: int, classes: Mapping[str, int],
                      background: int = -100) -> np.ndarray:
    """Class of each second ``s`` in ``[0, num_seconds)``: int64 ``[num_seconds]``.

    Second ``s`` takes the class of the segment ``[start, end)`` that contains ``s + 0.5``, its
    middle, so a boundary inside a second goes to whichever segment covers more of it; half-open
    segments give a shared boundary to the later segment only. Where segments overlap, the one
    that sorts last by (start, end, label) wins: a later, nested step is the more specific one.
    Seconds no segment covers get ``background`` (-100 is what cross entropy ignores by default).
    Raises ValueError for a label not in ``classes`` (checked for every segment, so a vocabulary
    built from other videos fails loudly rather than mislabelling).
    """
    if num_seconds < 0:
        raise ValueError(f"num_seconds must be >= 0, got {num_seconds}")
    unknown = sorted({s["label"] for s in segments} - set(classes))
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not in the class vocabulary "
                         f"({len(unknown)} unknown label(s): {unknown})")
    middles = np.arange(num_seconds, dtype=np.float64) + 0.5
    labels = np.full(num_seconds, background, dtype=np.int64)
    # Few segments per video: one vectorised pass each; later ones overwrite earlier ones.
    for segment in sorted(segments, key=lambda s: (s["start"], s["end"], s["label"])):
        inside = (middles >= segment["start"]) & (middles < segment["end"])
        labels[inside] = classes[segment["label"]]
    return labels


# ----------------------------------------------------------------------------- entry points

ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "webvid": adapt_webvid,
    "howto100m": adapt_howto100m,
    "msrvtt": adapt_msrvtt,
    "youcook2": adapt_youcook2,
    "qa": adapt_qa,
    "mc": adapt_mc,
}


def adapter_options(fmt: str) -> list[str]:
    """The format-specific options ``fmt`` accepts (beyond ``split`` and ``ext``)."""
    parameters = inspect.signature(_adapter(fmt)).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in ("split", "ext")]


def _adapter(fmt: str) -> Callable[..., AdapterResult]:
    if fmt not in ADAPTERS:
        raise AdapterError(f"unknown annotation format {fmt!r}; known formats: {', '.join(ADAPTERS)}")
    return ADAPTERS[fmt]


def adapt(fmt: str, annotations: str, video_root: str, *, split: str | None = None, ext: str = ".mp4",
          **options: Any) -> AdapterResult:
    """Turn the annotation file ``annotations`` of format ``fmt`` into a manifest.

    ``video_root`` is where the videos live; ``ext`` their file extension. ``split`` is given to
    every video of formats without splits, and selects the videos of formats with splits (see
    the module docstring). ``options`` are format-specific (:func:`adapter_options`).
    Raises :class:`AdapterError` for an unknown format or option, a bad split, or an unusable file.
    """
    adapter = _adapter(fmt)
    unknown = sorted(set(options) - set(adapter_options(fmt)))
    if unknown:
        raise AdapterError(f"format {fmt!r} has no option(s) {unknown}; "
                           f"its options: {adapter_options(fmt) or 'none'}")
    if split is not None and split not in SPLITS:
        raise AdapterError(f"split {split!r} is not one of {SPLITS}")
    if ext and not ext.startswith("."):
        ext = "." + ext
    return adapter(annotations, video_root, split=split, ext=ext, **options)


def qa_uri(manifest_uri: str) -> str:
    """Where :func:`write_result` puts the qa table: ``manifest.parquet`` -> ``manifest.qa.parquet``."""
    stem = manifest_uri[: -len(".parquet")] if manifest_uri.endswith(".parquet") else manifest_uri
    return stem + ".qa.parquet"


def write_result(result: AdapterResult, manifest_uri: str) -> list[str]:
    """Write the manifest to ``manifest_uri`` and any qa table to :func:`qa_uri`; returns the URIs."""
    write_manifest(result.manifest, manifest_uri)
    written = [manifest_uri]
    if result.qa is not None:
        fs, path = storage.arrow_filesystem(qa_uri(manifest_uri))
        pq.write_table(result.qa.cast(QA_SCHEMA), path, filesystem=fs, compression="zstd")
        written.append(qa_uri(manifest_uri))
    return written
