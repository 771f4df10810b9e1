"""The object store interface against a real S3 server, and the local-folder implementation alike."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from store.objects import LocalObjectStore, ObjectNotFound, ObjectStore, open_store


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_store(f"s3://antidote-store-{uuid.uuid4().hex[:8]}/some/prefix", endpoint)


@pytest.mark.integration
def test_round_trip_size_stream_and_delete(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 20_000  # 5 MB: boto3 still uploads it in one part, local copies in chunks
    src.write_bytes(payload)
    store.put_file("scans/a/inputs/model.safetensors", src)
    store.put_file("scans/a/artifacts/x.safetensors", src)
    store.put_file("scans/b/inputs/model.safetensors", src)
    assert store.size("scans/a/inputs/model.safetensors") == len(payload)
    assert b"".join(store.iter_bytes("scans/a/inputs/model.safetensors")) == payload
    dest = tmp_path / "dest.bin"
    store.get_file("scans/a/artifacts/x.safetensors", dest)
    assert dest.read_bytes() == payload
    assert store.delete_prefix("scans/a") == 2
    with pytest.raises(ObjectNotFound):
        store.size("scans/a/inputs/model.safetensors")
    with pytest.raises(ObjectNotFound):
        store.get_file("scans/a/inputs/model.safetensors", dest)
    with pytest.raises(ObjectNotFound):
        store.iter_bytes("scans/a/artifacts/x.safetensors")
    assert store.size("scans/b/inputs/model.safetensors") == len(payload)  # other scans untouched
    store.ping()


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a//b", ""])
def test_keys_cannot_escape(key: str, tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    with pytest.raises(ValueError):
        store.put_file(key, tmp_path)


def test_bad_storage_urls() -> None:
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3://")
    with pytest.raises(ValueError, match="unsupported"):
        open_store("ftp://x")
