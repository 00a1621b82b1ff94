"""Quarantine records: why a video, or one caption of it, was left out of a job's output.

One schema for the clip pipeline's ``quarantine.parquet`` and a feature set's
``_quarantine/`` files. ``clip_index`` is null for a video that could not be read at all and the
caption's index for a caption past the video's end (clipped to the end, or skipped). No video
decoding here, so the feature store and the training workers read quarantines without PyAV.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vidray import storage

QUARANTINE_SCHEMA = pa.schema([("video_id", pa.string()), ("uri", pa.string()),
                               ("clip_index", pa.int32()), ("error", pa.string())])

# Every reason of a skipped caption ends with this (clips.overrun_reason); the counts rely on it.
SKIPPED = ": skipped"


def conform(table: pa.Table) -> pa.Table:
    """``table`` as :data:`QUARANTINE_SCHEMA`. Files written before captions were recorded have
    no clip_index: each of their records is a whole video."""
    if "clip_index" not in table.column_names:
        table = table.append_column("clip_index", pa.nulls(table.num_rows, pa.int32()))
    return table.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


def quarantine_record(row: dict[str, Any], err: BaseException | str) -> dict[str, Any]:
    """Why one video of the manifest could not be read: ``{video_id, uri, clip_index: None, error}``
    (``err``: the exception, or the reason a record made elsewhere gave)."""
    return {"video_id": row["video_id"], "uri": row["uri"], "clip_index": None,
            "error": err if isinstance(err, str) else f"{type(err).__name__}: {err}"}


def overrun_counts(quarantine: pa.Table) -> dict[str, int]:
    """``quarantined`` (whole videos), ``clips_clipped`` and ``clips_skipped`` of a quarantine table."""
    quarantine = conform(quarantine)
    captions = quarantine.filter(pc.is_valid(quarantine["clip_index"]))["error"].to_pylist()
    skipped = sum(reason.endswith(SKIPPED) for reason in captions)
    return {"quarantined": quarantine.num_rows - len(captions),
            "clips_clipped": len(captions) - skipped, "clips_skipped": skipped}


# -- per-video JSON records, written from inside Ray tasks ------------------------------------

def _record_uri(output: str, video_id: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in video_id)
    return storage.join(output, "_quarantine", f"{safe}-{zlib.crc32(video_id.encode()):08x}.json")


def write_quarantine(output: str, video_id: str, records: list[dict[str, Any]]) -> None:
    """Write all of one video's records as ``output/_quarantine/<id>.json``: from inside a Ray
    task, one file per video, so a retried task overwrites its records instead of adding to them."""
    storage.write_bytes(_record_uri(output, video_id), json.dumps(records).encode())


def quarantine_video(output: str, row: dict[str, Any], err: BaseException) -> dict[str, Any]:
    """Record (and return) why one video could not be read (see :func:`write_quarantine`)."""
    record = quarantine_record(row, err)
    write_quarantine(output, row["video_id"], [record])
    return record


def gather_quarantine(output: str) -> pa.Table:
    """Every record under ``output/_quarantine/``, also written as ``output/quarantine.parquet``."""
    fs, path = storage.filesystem(storage.join(output, "_quarantine"))
    records = []
    if fs.exists(path):
        for name in sorted(fs.ls(path, detail=False)):
            with fs.open(name, "rb") as f:
                records.extend(json.loads(f.read()))  # a video's records, in caption order
    table = pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA)
    arrow_fs, qpath = storage.arrow_filesystem(storage.join(output, "quarantine.parquet"))
    pq.write_table(table, qpath, filesystem=arrow_fs)
    return table
