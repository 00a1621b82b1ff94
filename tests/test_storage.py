"""URIs: local paths and s3:// on the local endpoint, and clear errors when storage fails."""

from __future__ import annotations

import re

import pytest

from vidray import storage
from vidray.storage import StorageError


def test_join_and_parent():
    assert storage.join("s3://b/root", "a", "v.mp4") == "s3://b/root/a/v.mp4"
    assert storage.parent("s3://b/root/a/v.mp4") == "s3://b/root/a"
    assert storage.join("/data", "x") == "/data/x"
    assert storage.parent("/data/x/m.parquet") == "/data/x"


def test_local_round_trip_creates_folders(tmp_path):
    uri = str(tmp_path / "deep" / "er" / "f.bin")
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc" and storage.exists(uri)
    assert storage.read_bytes("file://" + uri) == b"abc"


def test_s3_round_trip_through_aws_endpoint_url(s3_uri):
    uri = storage.join(s3_uri, "x", "f.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri) and not storage.exists(storage.join(s3_uri, "nope"))


def test_missing_objects_name_the_uri(tmp_path, s3_uri):
    for uri in (str(tmp_path / "nope.mp4"), storage.join(s3_uri, "nope.mp4")):
        with pytest.raises(StorageError, match="no such file or object") as info:
            storage.read_bytes(uri)
        assert uri in str(info.value)


def test_unreachable_endpoint_is_one_clear_error(monkeypatch, capfd):
    # Nothing listens on port 9 of loopback: a real connection failure, not a mock.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("VIDRAY_STORAGE_RETRY_S", "2")
    with pytest.raises(storage.StorageUnreachable, match="unreachable for 2 s.*AWS_ENDPOINT_URL") as info:
        storage.read_bytes("s3://some-bucket/v.mp4")
    warnings = capfd.readouterr().err.splitlines()
    assert str(info.value).startswith("s3://some-bucket/v.mp4: ") and "http://127.0.0.1:9" in str(info.value)
    assert isinstance(info.value, StorageError)
    # read_bytes retries the open inside its own retry: the loop that waited says how often it tried.
    # (one attempt when a loaded machine makes the first one outlast the 2 s)
    assert re.search(r"\(\d+ attempts?; last: EndpointConnectionError", str(info.value)), str(info.value)
    # It waited with backoff before giving up, saying so each time.
    assert warnings and all("storage unreachable" in w and "try " in w for w in warnings)


def test_setup_mistakes_are_said_at_once_through_the_cli(tmp_path):
    # Real processes with a real environment: no keys anywhere (no env, no ~/.aws, no instance
    # metadata), then the local stack's keys without its endpoint. Neither waits out retries.
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO

    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base |= {"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true", "VIDRAY_STORAGE_RETRY_S": "300"}
    cases = [({}, "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
             ({"AWS_ACCESS_KEY_ID": "vidray-local", "AWS_SECRET_ACCESS_KEY": "vidray-local-secret"},
              "the local stack's key but AWS_ENDPOINT_URL is not set")]
    for env, said in cases:
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "features", "ls", "s3://bucket/sets"],
                             cwd=REPO, env=base | env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and said in out.stderr, out.stderr[-2000:]
        assert 'eval "$(vidray stack env)"' in out.stderr and "Traceback" not in out.stderr
        assert time.monotonic() - started < 60   # no retry loop (its budget here is 300 s)


def test_only_an_endpoint_that_does_not_answer_is_retried(tmp_path):
    import botocore.exceptions

    calls = []

    def refused_twice():
        calls.append(1)
        if len(calls) < 3:
            raise StorageError("s3://b/k: cannot reach it") from botocore.exceptions.EndpointConnectionError(
                endpoint_url="http://127.0.0.1:9")
        return "ok"
    assert storage.call_with_retries(refused_twice, "s3://b/k", warn=lambda m: None) == "ok" and len(calls) == 3
    # A definite answer is not retried, and neither is any error for a local path.
    for uri, err in (("s3://b/k", FileNotFoundError("s3://b/k")), (str(tmp_path), ConnectionResetError())):
        calls.clear()

        def fails(err=err):
            calls.append(1)
            raise err
        with pytest.raises(type(err)):
            storage.call_with_retries(fails, uri, warn=lambda m: None)
        assert len(calls) == 1
    assert storage.is_unreachable(OSError(16, "SlowDown")) and not storage.is_unreachable(PermissionError())
