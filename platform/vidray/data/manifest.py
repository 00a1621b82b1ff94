"""The manifest: one row per video, the single entry point of every data job.

Adapters turn the formats people bring into it; ``vidray synth`` writes it; the clip pipeline
and the feature store read it. Columns:

- ``video_id``   unique string id
- ``uri``        where the video lives (local path or s3://...)
- ``split``      "train" | "val" | "test"
- ``duration_s`` seconds, null when unknown until probed
- ``fps``, ``width``, ``height``  null when unknown until probed
- ``captions``   list of {start, end, text}; start/end in seconds, null when the caption is
  for the whole video
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from vidray import storage

CAPTION_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string())])

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("split", pa.string()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("captions", pa.list_(CAPTION_TYPE)),
    ]
)

SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest row breaks the contract above."""


def manifest_table(rows: list[dict]) -> pa.Table:
    """Build a manifest table from dicts, filling absent optional columns with nulls.

    Raises :class:`ManifestError` on a missing id/uri, a duplicate ``video_id`` or an unknown split.
    """
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for key in ("video_id", "uri"):
            if not row.get(key):
                raise ManifestError(f"manifest row {i}: missing {key!r}")
        if row["video_id"] in seen:
            raise ManifestError(f"manifest row {i}: duplicate video_id {row['video_id']!r}")
        seen.add(row["video_id"])
        if row.get("split", "train") not in SPLITS:
            raise ManifestError(f"manifest row {i}: split {row['split']!r} is not one of {SPLITS}")
    columns = {name: [row.get(name) for row in rows] for name in MANIFEST_SCHEMA.names}
    columns["split"] = [s or "train" for s in columns["split"]]
    columns["captions"] = [c or [] for c in columns["captions"]]
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def write_manifest(table: pa.Table, uri: str) -> None:
    """Write ``table`` to ``uri`` as one Parquet file (deterministic bytes for equal tables)."""
    table = table.cast(MANIFEST_SCHEMA)
    fs, path = storage.arrow_filesystem(uri)
    storage.makedirs(storage.parent(uri))
    pq.write_table(table, path, filesystem=fs, compression="zstd")


def read_manifest(uri: str) -> pa.Table:
    """Read and check a manifest; the error names the missing columns."""
    fs, path = storage.arrow_filesystem(uri)
    try:
        table = storage.call_with_retries(lambda: pq.read_table(path, filesystem=fs), uri)
    except storage.StorageUnreachable:
        raise
    except (FileNotFoundError, OSError) as err:
        raise ManifestError(f"{uri}: cannot read manifest ({err})") from err
    missing = [n for n in ("video_id", "uri") if n not in table.column_names]
    if missing:
        raise ManifestError(f"{uri}: not a vidray manifest, missing columns {missing}")
    for name in MANIFEST_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), MANIFEST_SCHEMA.field(name).type))
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def split_videos(manifest: str, split: str) -> set[str] | None:
    """Video ids of a manifest split (None without a manifest: every video)."""
    if not manifest:
        return None
    import pyarrow.compute as pc

    table = read_manifest(manifest)
    return set(table.filter(pc.equal(table["split"], split))["video_id"].to_pylist())
