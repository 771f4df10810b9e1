"""bench/datasets.py's Fashion-MNIST decoder (gzip IDX) and bench/datarepair_bench.py's corruptions."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bench.datarepair_bench import ROWS, _blur, corrupt
from bench.datasets import DataIntegrityError, decode_fashion_mnist_dir
from core.data.imageset import ImageSet


def _write_idx(directory: Path, split: str, n: int, labels: np.ndarray) -> None:
    images = np.arange(n * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(n, 28, 28)
    (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0" * 16 + images.tobytes()))
    (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 8 + labels.tobytes()))


def test_fashion_mnist_gzip_idx_is_decoded_and_checked(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", 100, np.repeat(np.arange(10, dtype=np.uint8), 10))
    _write_idx(tmp_path, "t10k", 50, np.repeat(np.arange(10, dtype=np.uint8), 5))
    train, test = decode_fashion_mnist_dir(tmp_path, sizes=(100, 50))
    assert train.x.shape == (100, 28, 28, 1) and test.x.shape == (50, 28, 28, 1) and train.y.dtype == np.int64
    assert train.x[0, 0, 1, 0] == 1 and list(np.bincount(test.y)) == [5] * 10
    _write_idx(tmp_path, "t10k", 50, np.zeros(50, dtype=np.uint8))
    with pytest.raises(DataIntegrityError, match="balanced"):
        decode_fashion_mnist_dir(tmp_path, sizes=(100, 50))
    with pytest.raises(DataIntegrityError, match="IDX payload"):
        decode_fashion_mnist_dir(tmp_path, sizes=(99, 50))


def test_corruption_rows_mark_what_they_change() -> None:
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (500, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 500))
    for row in ROWS:
        out, bad, attack = corrupt("fmnist", row, data, 0)
        changed = (out.y != data.y) | (out.x != data.x).reshape(500, -1).any(1)
        assert (changed <= bad).all() and bad.sum() > 0, row  # nothing outside the mask is touched
        if row.startswith("sym"):
            assert bad.sum() == round(int(row[3:]) / 100 * 500) and (out.y[bad] != data.y[bad]).all()
        if row == "corrupt20":
            assert (out.y == data.y).all()
        assert (attack is not None) == (row == "badnets10")
    flat = np.full((1, 8, 8, 1), 7, np.uint8)
    assert (_blur(flat) == 7).all()
