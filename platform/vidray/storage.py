"""Every path in vidray is a URI: a local path, ``file://...`` or ``s3://bucket/key``.

S3-compatible endpoints are configured the standard way, from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``),
never by code edits. We pass the endpoint to s3fs and pyarrow explicitly because not every
client version reads ``AWS_ENDPOINT_URL`` by itself.

An endpoint that does not answer (connection refused or reset, timeouts, 5xx) is retried with
exponential backoff for up to ``VIDRAY_STORAGE_RETRY_S`` seconds (default 300) before a
:class:`StorageUnreachable` names the URI and the endpoint; a definite answer (no such object,
access denied) is never retried.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import time
from typing import IO, Callable, Iterator, TypeVar

import fsspec
import pyarrow.fs as pafs

from vidray.notes import note
from vidray.stack import LOCAL_KEY_ID   # the local stack's fixed key: it opens the local endpoint only


T = TypeVar("T")


class StorageError(RuntimeError):
    """A URI could not be reached; the message names the URI and the likely fix."""


class StorageUnreachable(StorageError):
    """The storage endpoint did not answer, even after retrying with backoff."""


# What an object store says when it is down or overloaded, once s3fs has translated it.
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                       errno.ENETUNREACH, errno.EPIPE, errno.EBUSY, errno.EREMOTEIO}
# Transport failures; botocore's HTTPClientError wraps whatever the HTTP client raised.
_UNREACHABLE_NAMES = ("Connection", "Connector", "Timeout", "Disconnected", "ClientPayload", "HTTPClient")


def is_unreachable(err: BaseException | None) -> bool:
    """Whether ``err`` or anything that caused it says the endpoint did not answer (refused,
    reset, timed out, 503), as opposed to a definite answer such as "no such object"."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (StorageUnreachable, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, OSError) and err.errno in _UNREACHABLE_ERRNOS:
            return True
        # botocore, aiohttp and urllib3 errors share no base class with the builtins above.
        if type(err).__module__.split(".")[0] in ("botocore", "aiohttp", "urllib3") and any(
                name in type(err).__name__ for name in _UNREACHABLE_NAMES):
            return True
        err = err.__cause__ or err.__context__
    return False


def retry_budget_s() -> float:
    return float(os.environ.get("VIDRAY_STORAGE_RETRY_S", "300"))


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"


def _warn(message: str) -> None:
    note(message)  # from an extraction actor too: the driver shows it


def call_with_retries(fn: Callable[[], T], uri: str, warn: Callable[[str], None] = _warn) -> T:
    """``fn()``, retried with exponential backoff (1 s doubling to 30 s) while the storage of
    ``uri`` does not answer, for up to :func:`retry_budget_s`; then :class:`StorageUnreachable`.
    Other errors, and any error for a local path, are raised at once."""
    budget = retry_budget_s()
    deadline, delay, tries = time.monotonic() + budget, 1.0, 0
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_remote(uri) or not is_unreachable(err):
                raise
            inner = _gave_up(err)
            if inner is not None:  # a nested call already waited out the budget: say its words
                raise inner from None
            tries += 1
            left = deadline - time.monotonic()
            cause = _root(err)
            if left <= 0:
                gave_up = StorageUnreachable(
                    f"{uri}: storage unreachable for {budget:.0f} s ({tries} attempt{'s' * (tries > 1)}; last: {cause}); check "
                    f"that {endpoint()} is up and AWS_ENDPOINT_URL names it, then rerun: finished work "
                    "is kept (VIDRAY_STORAGE_RETRY_S sets how long to wait)")
                gave_up.retried = True
                raise gave_up from err
            pause = min(delay, left)
            warn(f"{uri}: storage unreachable ({cause}); try {tries + 1} in {pause:.0f} s")
            time.sleep(pause)
            delay = min(delay * 2, 30.0)


def _gave_up(err: BaseException | None) -> StorageUnreachable | None:
    """The StorageUnreachable of a retry loop that ran out, in ``err`` or what caused it."""
    while err is not None:
        if getattr(err, "retried", False):
            return err
        err = err.__cause__ or err.__context__
    return None


def reach(uri: str, fn: Callable[[], T]) -> T:
    """``fn()``, one operation on ``uri``'s storage: its errors made clear (:func:`storage_errors`)
    and retried while the endpoint does not answer (:func:`call_with_retries`)."""
    def attempt() -> T:
        with storage_errors(uri):
            return fn()
    return call_with_retries(attempt, uri)


def _root(err: BaseException) -> str:
    """The innermost cause of ``err``, in one short line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err)[:200]}"


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _s3_options() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Other processes (Ray workers, a killed run) write what we list: never trust a cached listing.
    options: dict = {"use_listings_cache": False}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


_CREDENTIALS_FOUND = False


def check_s3_setup(uri: str) -> None:
    """Missing credentials, or the local stack's keys without its endpoint, are setup mistakes:
    said at once, naming what to set, instead of a raw botocore error or minutes of retries."""
    global _CREDENTIALS_FOUND
    stack_hint = 'for the local stack: eval "$(vidray stack env)"'
    if os.environ.get("AWS_ACCESS_KEY_ID") == LOCAL_KEY_ID and not (
            os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        raise StorageError(f"{uri}: AWS_ACCESS_KEY_ID is the local stack's key but AWS_ENDPOINT_URL is not set, "
                           f"so requests go to AWS itself; {stack_hint}")
    if _CREDENTIALS_FOUND or os.environ.get("AWS_ACCESS_KEY_ID"):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:   # env, profile, instance role, ...
        raise StorageError(f"{uri}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                           f"AWS_PROFILE, or give the node an instance role); {stack_hint}")
    _CREDENTIALS_FOUND = True


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        check_s3_setup(uri)
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
        kind = StorageUnreachable if is_remote(uri) and is_unreachable(err) else StorageError
        raise kind(f"{uri}: cannot reach it ({type(err).__name__}: {err}); check "
                   "AWS_ENDPOINT_URL and the credentials") from err


def open_uri(uri: str, mode: str = "rb") -> IO:
    """Open ``uri`` (retried while the endpoint does not answer); missing objects and an
    endpoint that stays down raise :class:`StorageError`."""
    fs, path = filesystem(uri)

    def opened() -> IO:
        if "w" in mode and not is_remote(uri):
            fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        return fs.open(path, mode)
    return reach(uri, opened)


def read_bytes(uri: str) -> bytes:
    def read() -> bytes:
        with open_uri(uri, "rb") as f:
            return f.read()
    return reach(uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` as one object (one PUT): readers see all of it or nothing, so a retry
    after a failed attempt cannot leave half an object."""
    def write() -> None:
        with open_uri(uri, "wb") as f:
            f.write(data)
    reach(uri, write)


def copy(src: str, dst: str) -> None:
    """Copy one file or object to ``dst`` on the same storage; the copy appears whole or not at
    all (one server-side request on an object store; locally a temporary file, renamed)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if is_remote(dst):
        reach(dst, lambda: fs.copy(src_path, dst_path))
        return

    def local_copy() -> None:
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        # Dot-prefixed: a killed copy's leftover is skipped by Parquet readers of the folder.
        tmp = os.path.join(os.path.dirname(dst_path), f".{os.path.basename(dst_path)}.tmp-{os.getpid()}")
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    reach(dst, local_copy)


def parent(uri: str) -> str:
    """The URI of the folder holding ``uri``."""
    uri = str(uri).rstrip("/")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.dirname(rest)
    return os.path.dirname(os.path.abspath(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return reach(uri, lambda: fs.exists(path))


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
