"""Every path in vidray is a URI: a local path, ``file://...`` or ``s3://bucket/key``.

S3-compatible endpoints are configured the standard way, from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``),
never by code edits. We pass the endpoint to s3fs and pyarrow explicitly because not every
client version reads ``AWS_ENDPOINT_URL`` by itself.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import IO, Iterator

import fsspec
import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A URI could not be reached; the message names the URI and the likely fix."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _s3_options() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Other processes (Ray workers, a killed run) write what we list: never trust a cached listing.
    options: dict = {"use_listings_cache": False}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = _s3_options() if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``uri`` (what Parquet writers and Ray Data take) and the path."""
    fs, path = filesystem(uri)
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn any failure to reach ``uri`` into a :class:`StorageError` naming it and the fix."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file or object") from err
    except PermissionError as err:
        raise StorageError(f"{uri}: permission denied (check the credentials in the AWS_* "
                           "environment variables, or the file's mode)") from err
    except IsADirectoryError as err:
        raise StorageError(f"{uri}: is a directory, not a file") from err
    except Exception as err:  # botocore/aiohttp errors do not derive from OSError
        if not is_remote(uri) and not isinstance(err, OSError):
            raise
        raise StorageError(f"{uri}: cannot reach it ({type(err).__name__}: {err}); check "
                           "AWS_ENDPOINT_URL and the credentials") from err


def open_uri(uri: str, mode: str = "rb") -> IO:
    """Open ``uri``; missing objects and unreachable endpoints raise :class:`StorageError`."""
    fs, path = filesystem(uri)
    with storage_errors(uri):
        if "w" in mode and not is_remote(uri):
            fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    with storage_errors(uri), open_uri(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    with storage_errors(uri), open_uri(uri, "wb") as f:
        f.write(data)


def parent(uri: str) -> str:
    """The URI of the folder holding ``uri``."""
    uri = str(uri).rstrip("/")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.dirname(rest)
    return os.path.dirname(os.path.abspath(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with storage_errors(uri):
        return fs.exists(path)


def makedirs(uri: str) -> None:
    """Create a local directory; object stores need none."""
    if not is_remote(uri):
        fs, path = filesystem(uri)
        fs.makedirs(path, exist_ok=True)


def with_scheme(uri: str, path: str) -> str:
    """Turn a path returned by an fsspec listing back into a URI of the same scheme as ``uri``."""
    if "://" in str(uri) and not str(uri).startswith("file://"):
        return f"{str(uri).split('://', 1)[0]}://{path}"
    return path
