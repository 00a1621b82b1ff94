"""URIs: local paths and s3:// on the local endpoint, and clear errors when storage fails."""

from __future__ import annotations

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


def test_unreachable_endpoint_is_one_clear_error(monkeypatch):
    # Nothing listens on port 9 of loopback: a real connection failure, not a mock.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="cannot reach it.*AWS_ENDPOINT_URL") as info:
        storage.read_bytes("s3://some-bucket/v.mp4")
    assert "s3://some-bucket/v.mp4" in str(info.value)
