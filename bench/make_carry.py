"""Write ``.carry/cifar10_small.npz``: the CIFAR-10 subset a network-less benchmark machine trains on.

The accelerator machine has no network, so the benchmark data travels with the working tree (``.carry/`` is
git-ignored, and a carried folder may hold 64 MiB in all). The file holds a seeded, class-balanced subset:
``x_train`` is 17,500 images for training a backdoored model followed by 2,500 for the defender's clean
subset (both balanced), and ``x_test`` is a balanced test subset. ``idx_train`` / ``idx_test`` record the
source indices into the full CIFAR-10 splits, and ``n_model_train`` the boundary.

Usage: ``.venv/bin/python -m bench.make_carry [--out .carry/cifar10_small.npz] [--n-test 3000] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.datasets import DEFAULT_CACHE_DIR, load_cifar10
from core.data.imageset import ImageSet

N_MODEL_TRAIN = 17_500
N_CLEAN_SUBSET = 2_500
MAX_BYTES = 60 * 1024 * 1024


def balanced_indices(y: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given ``sizes``, each holding every class equally, shuffled, seeded."""
    classes = np.unique(y)
    for n in sizes:
        if n % len(classes):
            raise ValueError(f"size {n} is not a multiple of the {len(classes)} classes")
    rng = np.random.default_rng(seed)
    per_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    out, start = [], 0
    for n in sizes:
        k = n // len(classes)
        chosen = []
        for c in classes:
            if start + k > len(per_class[c]):
                raise ValueError(f"class {c} has only {len(per_class[c])} samples")
            chosen.append(per_class[c][start : start + k])
        out.append(rng.permutation(np.concatenate(chosen)))
        start += k
    return out


def split_carry(train: ImageSet) -> tuple[ImageSet, ImageSet]:
    """(model-training set, defender's clean subset) from the carry file's train part."""
    return train.subset(np.arange(N_MODEL_TRAIN)), train.subset(np.arange(N_MODEL_TRAIN, len(train)))


def make_carry(out: Path, n_test: int, seed: int, cache_dir: Path) -> int:
    """Write the subset file and return its size in bytes."""
    train, test = load_cifar10(cache_dir)
    idx_model, idx_clean = balanced_indices(train.y, [N_MODEL_TRAIN, N_CLEAN_SUBSET], seed)
    idx_train = np.concatenate([idx_model, idx_clean])
    (idx_test,) = balanced_indices(test.y, [n_test], seed + 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        x_train=train.x[idx_train],
        y_train=train.y[idx_train],
        x_test=test.x[idx_test],
        y_test=test.y[idx_test],
        idx_train=idx_train.astype(np.int32),
        idx_test=idx_test.astype(np.int32),
        n_model_train=np.int64(N_MODEL_TRAIN),
    )
    return out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".carry/cifar10_small.npz"))
    parser.add_argument("--n-test", type=int, default=3_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    size = make_carry(args.out, args.n_test, args.seed, args.cache_dir)
    if size > MAX_BYTES and args.n_test > 2_000:
        print(f"{size / 2**20:.1f} MiB is over {MAX_BYTES / 2**20:.0f} MiB; retrying with 2,000 test images")
        size = make_carry(args.out, 2_000, args.seed, args.cache_dir)
    print(f"wrote {args.out}: {size:,} bytes ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
