"""The feature store's layout, versions and commit protocol.

    <root>/<name>/<version>/part-00000.parquet ...                one part per shard of the source videos
    <root>/<name>/<version>/_quarantine/quarantine-00000.parquet  the shard's quarantine, with reasons
    <root>/<name>/<version>/_manifest.json                        written last: the commit point

Only parts sit at the top of a version, so the folder reads as the feature set's rows alone with
any Parquet reader (``pq.read_table(version)``, pyarrow datasets, DuckDB, Polars and Spark skip
``_``-prefixed paths). A quarantine record is a video that could not be read (``clip_index``
null) or, for the clip extractors, a caption past the video's end (its ``clip_index``).
Versions written before ``_quarantine/`` keep their quarantine files at the top level; their
manifest lists them there, and :meth:`FeatureSet.quarantine` still reads them.

The version is a digest of what determines the content: extractor name, its config, the
weights digest, the source manifest's digest and the extractor's schema version. Changing any
of them makes a new version; the old one stays readable. The manifest also records the schema,
row counts, parts and the code version.

Exactly once: the source videos (sorted by video_id) are cut into fixed shards; shard ``i`` is
written as its quarantine file, then its part file, each in a single atomic step (one PUT on
object storage, write-then-rename locally). A shard is done when its part exists, so a rerun after
a kill at any point redoes only unfinished shards, and no video can land in two parts. Readers
only open versions whose ``_manifest.json`` exists, and only the parts it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vidray import __version__, storage
from vidray.data.manifest import read_manifest
from vidray.data.quarantine import QUARANTINE_SCHEMA, conform as conform_quarantine


MANIFEST_NAME = "_manifest.json"
QUARANTINE_DIR = "_quarantine"


class FeatureStoreError(RuntimeError):
    """A feature set is missing, uncommitted or inconsistent; the message names it."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    data = value if isinstance(value, bytes) else canonical_json(value).encode()
    return hashlib.sha256(data).hexdigest()


def version_id(identity: dict) -> str:
    """The version of a feature set: the first 12 hex digits of the digest of its identity."""
    return "v-" + digest(identity)[:12]


def version_uri(root: str, name: str, version: str) -> str:
    return storage.join(root, name, version)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def quarantine_name(shard: int) -> str:
    """The shard's quarantine file, relative to the version (as the manifest lists it)."""
    return f"{QUARANTINE_DIR}/quarantine-{shard:05d}.parquet"


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding: all but those of floats or bytes. Features and JPEG
    frames rarely repeat a value, so a dictionary only adds an index to each (S3D's fp16 features
    took 1.23x their raw size with one, 0.94x without); integer ids and VQ codes come from a small
    vocabulary and pack tighter with one."""
    def leaf(t: pa.DataType) -> pa.DataType:
        return leaf(t.value_type) if pa.types.is_list(t) or pa.types.is_large_list(t) \
            or pa.types.is_fixed_size_list(t) else t

    def repeats(t: pa.DataType) -> bool:
        return not (pa.types.is_floating(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t))

    return [f.name for f in schema if repeats(leaf(f.type))]


def write_table_atomically(table: pa.Table, uri: str) -> None:
    """Write a Parquet file so that readers see all of it or nothing.

    Object stores make a single PUT atomic; locally we write a temporary file and rename it.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=dictionary_columns(table.schema))
    data = sink.getvalue().to_pybytes()
    if storage.is_remote(uri):
        storage.write_bytes(uri, data)
        return
    path = uri.removeprefix("file://")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Dot-prefixed: a killed run's leftover is skipped by Parquet readers of the version folder.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(version: str, shard: int, part: pa.Table, quarantine: list[dict]) -> None:
    """A shard's quarantine records, then its part, each atomically: the part's existence marks
    the shard done (:func:`done_shards`), so a rerun never skips a shard whose records are missing."""
    write_table_atomically(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA),
                           storage.join(version, quarantine_name(shard)))
    write_table_atomically(part, storage.join(version, part_name(shard)))


def done_shards(version: str) -> set[int]:
    """Shards whose part file exists in the version folder (committed or not)."""
    fs, path = storage.filesystem(version)
    listing = storage.reach(version, lambda: fs.ls(path, detail=False) if fs.exists(path) else [])
    names = [os.path.basename(p) for p in listing]
    return {int(n[5:10]) for n in names if n.startswith("part-") and n.endswith(".parquet")}


@dataclass
class FeatureSet:
    """A committed feature set version."""

    uri: str
    manifest: dict

    @property
    def part_uris(self) -> list[str]:
        return [storage.join(self.uri, p["file"]) for p in self.manifest["parts"]]

    @property
    def quarantine_uris(self) -> list[str]:
        # Paths relative to the version: under _quarantine/, or at the top level in older versions.
        return [storage.join(self.uri, q) for q in self.manifest.get("quarantine_files", [])]

    @property
    def key(self) -> list[str]:
        return self.manifest["key"]

    def quarantine(self) -> pa.Table:
        """Every quarantine record of the version, as :data:`QUARANTINE_SCHEMA`."""
        tables = [conform_quarantine(read_parquet(u)) for u in self.quarantine_uris]
        return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def is_committed(version: str) -> bool:
    return storage.exists(storage.join(version, MANIFEST_NAME))


def open_version(uri: str) -> FeatureSet:
    """The committed feature set at ``uri`` (``<root>/<name>/<version>``)."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        versions = committed_versions(uri)
        if versions:  # the set's folder, one level up from a version
            raise FeatureStoreError(f"{uri} is a feature set, not one of its versions: give a version, e.g. "
                                    + ", ".join(versions[-3:]) + f" (`vidray features ls {os.path.dirname(uri.rstrip('/'))}` "
                                    "lists them all)")
        raise FeatureStoreError(
            f"{uri}: no {MANIFEST_NAME}, so this is not a committed feature-set version (an "
            "extraction still running or killed?); rerun `vidray extract` to finish it, or "
            "`vidray features ls ROOT` to list committed versions")
    return FeatureSet(uri=uri.rstrip("/"), manifest=json.loads(storage.read_bytes(manifest_uri)))


def committed_versions(set_uri: str) -> list[str]:
    """The URIs of the committed versions in a feature set's folder (none if it is not one)."""
    fs, path = storage.filesystem(set_uri)
    if not fs.isdir(path):
        return []
    return [storage.with_scheme(set_uri, p) for p in sorted(fs.ls(path, detail=False))
            if os.path.basename(p.rstrip("/")).startswith("v-") and is_committed(storage.with_scheme(set_uri, p))]


def commit(version: str, manifest: dict) -> FeatureSet:
    """Write ``_manifest.json``: from now on readers see this version."""
    manifest = {**manifest, "code_version": __version__}
    storage.write_bytes(storage.join(version, MANIFEST_NAME),
                        json.dumps(manifest, indent=2, sort_keys=True).encode())
    return FeatureSet(uri=version, manifest=manifest)


def list_sets(root: str) -> list[dict]:
    """Every ``<name>/<version>`` under ``root``: committed or not, with row counts if committed."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        raise FeatureStoreError(f"{root}: no such feature-store root")
    out = []
    for name_path in sorted(fs.ls(path, detail=False)):
        if not fs.isdir(name_path):
            continue
        for version_path in sorted(fs.ls(name_path, detail=False)):
            if not fs.isdir(version_path):
                continue
            uri = storage.with_scheme(root, version_path)
            entry = {"name": os.path.basename(name_path), "version": os.path.basename(version_path),
                     "uri": uri, "committed": is_committed(uri)}
            if entry["committed"]:
                manifest = open_version(uri).manifest
                entry.update(rows=manifest["rows"], videos=manifest["videos"],
                             quarantined=manifest["quarantined"], extractor=manifest["extractor"])
            out.append(entry)
    return out


def open_dataset(uri: str, columns: list[str] | None = None):
    """A committed version as a Ray Dataset: the parts its manifest lists, read lazily, a block per
    part. Not ``ray.data.read_parquet``: its listing and metadata steps made opening a set 46x slower
    on a warm cluster (``python -m benchmarks open_dataset``), paid by every training run, its
    validation set and every evaluation; the manifest already names the files."""
    import ray

    parts = [{"part": p} for p in open_version(uri).part_uris]
    return ray.data.from_items(parts, override_num_blocks=max(1, len(parts))).map_batches(
        _read_parts, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": columns})


def _read_parts(batch: pa.Table, columns: list[str] | None) -> pa.Table:
    return pa.concat_tables([read_parquet(uri, columns=columns) for uri in batch["part"].to_pylist()])


def with_manifest_columns(ds, manifest_uri: str, columns: tuple[str, ...] = ("captions", "split")):
    """Inner-join a feature Dataset with manifest columns on ``video_id``.

    The manifest side is small (one row per video), so it is broadcast to the workers once
    rather than shuffled (Ray Data's own join also needs polars).
    """

    table = read_manifest(manifest_uri).select(["video_id", *columns])
    return ds.map_batches(_add_manifest_columns, batch_format="pyarrow",
                          fn_kwargs={"manifest": table, "columns": list(columns)})


def _add_manifest_columns(batch: pa.Table, manifest: pa.Table, columns: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    index = pc.index_in(batch["video_id"], value_set=manifest["video_id"])
    keep = pc.is_valid(index)
    batch, index = batch.filter(keep), index.filter(keep)
    for column in columns:
        batch = batch.append_column(column, manifest[column].take(index))
    return batch


def validate(uri: str) -> dict:
    """Check every part against the manifest: schema, row counts, feature widths, no duplicates.

    Returns a report with ``ok`` and a list of ``problems`` (empty when ok).
    """
    feature_set = open_version(uri)
    manifest = feature_set.manifest
    expected_schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(manifest["schema_ipc"])))
    problems, seen, rows = [], set(), 0
    for part, part_uri in zip(manifest["parts"], feature_set.part_uris):
        try:
            table = read_parquet(part_uri)
        except Exception as err:  # noqa: BLE001 - a missing or corrupt part is the finding
            problems.append(f"{part['file']}: unreadable ({err})")
            continue
        if not table.schema.equals(expected_schema):
            problems.append(f"{part['file']}: schema differs from the manifest's")
        if table.num_rows != part["rows"]:
            problems.append(f"{part['file']}: {table.num_rows} rows, manifest says {part['rows']}")
        rows += table.num_rows
        keys = list(zip(*[table[k].to_pylist() for k in feature_set.key]))
        for key in keys:
            if key in seen:
                problems.append(f"{part['file']}: duplicate key {dict(zip(feature_set.key, key))}")
            seen.add(key)
        for column, width in manifest.get("dims", {}).items():
            bad = _rows_with_wrong_width(table[column], width)
            if bad:
                problems.append(f"{part['file']}: {bad} rows of '{column}' are not {width} wide")
    if rows != manifest["rows"]:
        problems.append(f"{rows} rows in parts, manifest says {manifest['rows']}")
    return {"uri": feature_set.uri, "ok": not problems, "rows": rows, "parts": len(manifest["parts"]),
            "problems": problems}


def _rows_with_wrong_width(column: pa.ChunkedArray, width: int) -> int:
    """Rows of a list<list<x>> (or list<x>) column whose innermost lists are not ``width`` long."""
    import pyarrow.compute as pc

    flat = column.combine_chunks()
    while pa.types.is_list(flat.type.value_type) or pa.types.is_fixed_size_list(flat.type.value_type):
        flat = flat.flatten()
    lengths = pc.list_value_length(flat)
    return int(pc.sum(pc.not_equal(lengths, width)).as_py() or 0)
