"""Uploaded data files: .npz arrays and .zip image folders, valid and hostile."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.formats import (
    DataFormatError,
    DataLimits,
    UnsupportedDataFormatError,
    load_image_set,
    load_image_set_with_classes,
)
from tests import hostile_files as hf


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def _png(size: tuple[int, int] = (8, 6), mode: str = "RGB", value: int = 7) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value if mode in ("L", "P") else (value, 2 * value, 3 * value)).save(buf, "PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# ------------------------------------------------------------------------------------------------- npz


def test_npz_valid(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0], dtype=np.int32)
    data = load_image_set(_npz(tmp_path / "d.npz", x=x, y=y), num_classes=3)
    assert np.array_equal(data.x, x) and data.y.dtype == np.int64 and list(data.y) == list(y)


def test_npz_grayscale_promoted(tmp_path: Path) -> None:
    x = np.zeros((2, 5, 4), dtype=np.uint8)
    path = _npz(tmp_path / "d.npz", x=x, y=np.array([0, 1])).rename(tmp_path / "upload.tmp")
    data = load_image_set(path, filename="d.npz")
    assert data.x.shape == (2, 5, 4, 1)


def test_npz_object_array_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataFormatError, match="holds Python objects, which are refused"):
        load_image_set(path)


def test_npz_labels_out_of_range(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((4, 2, 2, 1), np.uint8), y=np.array([0, 9, 12, -1]))
    with pytest.raises(DataFormatError, match=r"2 of 4 labels lie outside \[0, 10\)"):
        load_image_set(path, num_classes=10)


def test_npz_uint64_labels_are_reported_as_stored(tmp_path: Path) -> None:
    x = np.zeros((2, 4, 4), dtype=np.uint8)
    path = _npz(tmp_path / "d.npz", x=x, y=np.array([1, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(DataFormatError, match=r"outside \[0, 10\) \(found labels 1..18446744073709551615\)"):
        load_image_set(path, num_classes=10)


def test_npz_negative_labels_without_num_classes(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((2, 2, 2, 1), np.uint8), y=np.array([0, -3]))
    with pytest.raises(DataFormatError, match="1 of 2 labels are negative"):
        load_image_set(path)


def test_npz_missing_key(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", images=np.zeros((1, 2, 2, 1), np.uint8), y=np.array([0]))
    with pytest.raises(DataFormatError, match="no array 'x'"):
        load_image_set(path)


def test_npz_wrong_dtype(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((1, 2, 2, 3), np.float32), y=np.array([0]))
    with pytest.raises(DataFormatError, match="x must be uint8"):
        load_image_set(path)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((2, 2, 2, 4), np.uint8), np.array([0, 1]), "C 1 or 3"),
        (np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 1, 1]), r"y must have shape \(2,\)"),
        (np.zeros((2, 2, 2, 3), np.uint8), np.array([0.0, 1.0]), "integer labels"),
        (np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0, np.int64), "no images"),
        (np.zeros((2, 40, 40, 3), np.uint8), np.array([0, 1]), "over the limit of 1024"),
        # images without pixels: no model takes them, and the worker would fail on them late
        (np.zeros((2, 0, 0, 3), np.uint8), np.array([0, 1]), "0x0 pixels: an image needs at least one pixel"),
        (np.zeros((2, 8, 0), np.uint8), np.array([0, 1]), "0x8 pixels"),
    ],
)
def test_npz_bad_shapes(tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str) -> None:
    path = _npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataFormatError, match=message):
        load_image_set(path, limits=DataLimits(max_pixels_per_image=1024))


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="not a valid .npz"):
        load_image_set(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    path.write_bytes(b"x")
    with pytest.raises(UnsupportedDataFormatError):
        load_image_set(path)


# ------------------------------------------------------------------------------------------------- zip


def test_zip_class_index_folders(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/a.png": _png(), "2/b.png": _png(value=9), "2/c.PNG": _png()})
    data, names = load_image_set_with_classes(path, num_classes=3)
    assert names is None
    assert data.x.shape == (3, 6, 8, 3) and list(data.y) == [0, 2, 2]
    assert data.x[1, 0, 0].tolist() == [9, 18, 27]


def test_zip_class_name_folders_under_top_folder_mixed_modes(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, "JPEG")
    members = {
        "set/dog/1.png": _png(mode="L", value=5),
        "set/cat/1.jpg": buf.getvalue(),
        "set/cat/2.png": _png(mode="RGBA"),
        "__MACOSX/set/._x.png": b"junk",
    }
    data, names = load_image_set_with_classes(_zip(tmp_path / "d.zip", members))
    assert names == ["cat", "dog"]
    assert list(data.y) == [0, 0, 1] and data.x.shape == (3, 6, 8, 3)
    assert data.x[2, 0, 0].tolist() == [5, 5, 5]


def test_zip_too_many_class_names(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"a/1.png": _png(), "b/1.png": _png(), "c/1.png": _png()})
    with pytest.raises(DataFormatError, match="3 class folders but the model has num_classes=2"):
        load_image_set(path, num_classes=2)


def test_zip_label_out_of_range(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/1.png": _png(), "7/1.png": _png()})
    with pytest.raises(DataFormatError, match=r"class folder '7' names class index 7, not below num_classes=5"):
        load_image_set(path, num_classes=5)


@pytest.mark.parametrize(
    ("name", "message"),
    [("../evil.png", "climbs out"), ("0/../../evil.png", "climbs out"), ("/etc/evil.png", "absolute path"),
     ("0\\evil.png", "backslash")],
)
def test_zip_hostile_names(tmp_path: Path, name: str, message: str) -> None:
    path = _zip(tmp_path / "d.zip", {"0/ok.png": _png(), name: _png()})
    with pytest.raises(DataFormatError, match=message):
        load_image_set(path)


def test_zip_symlink_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0/ok.png", _png())
        info = zipfile.ZipInfo("0/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataFormatError, match="symbolic link"):
        load_image_set(path)


@pytest.mark.parametrize(("name", "entries"), [("d.zip", 70_000), ("d.npz", 1000)])
def test_a_flood_of_directory_entries_is_counted_before_zipfile_builds_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, entries: int) -> None:
    """Before: the member limit was checked on zipfile's list, built first at ~450 bytes per 47-byte entry (a
    53 MB upload of a million held 466 MB of the API's memory before the refusal)."""
    path = hf.directory_flood_zip(tmp_path / name, entries)
    monkeypatch.setattr(zipfile, "ZipFile", None)  # never reached
    with pytest.raises(DataFormatError, match="has at least 101 members, over the limit of 100"):
        load_image_set(path, limits=DataLimits(max_zip_members=100))


def test_zip_too_many_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {f"0/{i}.png": _png() for i in range(5)})
    with pytest.raises(DataFormatError, match="5 members, over the limit of 4"):
        load_image_set(path, limits=DataLimits(max_zip_members=4))


def test_zip_bomb_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/ok.png": _png(), "0/bomb.png": bytes(50_000_000)})
    with pytest.raises(DataFormatError, match="expands to more than the limit"):
        load_image_set(path, limits=DataLimits(max_expanded_bytes=10_000_000, max_compression_ratio=1e9))
    with pytest.raises(DataFormatError, match="fold, over the limit of 200"):
        load_image_set(path)


def test_zip_mismatched_sizes(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/a.png": _png((8, 6)), "1/b.png": _png((9, 6))})
    with pytest.raises(DataFormatError, match=r"'1/b.png' is 9x6 but '0/a.png' is 8x6"):
        load_image_set(path)


def test_zip_image_over_pixel_limit(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/a.png": _png((64, 64))})
    with pytest.raises(DataFormatError, match="64x64 = 4096 pixels, over the limit of 1000"):
        load_image_set(path, limits=DataLimits(max_pixels_per_image=1000))


def test_zip_not_an_image(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/a.png": b"not a png at all"})
    with pytest.raises(DataFormatError, match="not a readable PNG or JPEG"):
        load_image_set(path)


def test_zip_bad_layout(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"a.png": _png(), "0/b.png": _png()})
    with pytest.raises(DataFormatError, match="not laid out as <class>/<image>"):
        load_image_set(path)


# ---------------------------------------------------------------------------- issue 8: bombs and budgets


def test_npz_compressed_allowed_within_ratio(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=x, y=np.arange(6) % 2)
    data = load_image_set(path)
    assert np.array_equal(data.x, x) and data.y.tolist() == [0, 1, 0, 1, 0, 1]


def test_npz_deflate_bomb_refused_by_ratio(tmp_path: Path) -> None:
    path = hf.npz_bomb(tmp_path / "b.npz", 4 * 1024 * 1024)
    with pytest.raises(DataFormatError, match=r"array 'x' expands \d+-fold .* over the limit of 200"):
        load_image_set(path, limits=DataLimits(ratio_slack_bytes=0))
    with pytest.raises(DataFormatError, match=r"array 'x' expands to \d+ bytes, over the limit of 1000000"):
        load_image_set(path, limits=DataLimits(max_expanded_bytes=1_000_000))


def test_npz_header_larger_than_member_refused(tmp_path: Path) -> None:
    # the header promises a million images; the member holds a few bytes: nothing is allocated for it
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (1_000_000, 8, 8, 3)})
        zf.writestr("x.npy", buf.getvalue() + bytes(64))
        ybuf = io.BytesIO()
        np.save(ybuf, np.zeros(1_000_000, dtype=np.int64))
        zf.writestr("y.npy", ybuf.getvalue())
    with pytest.raises(DataFormatError, match="array 'x' of shape .* needs 192000000 bytes but the member holds"):
        load_image_set(path, limits=DataLimits(max_images=10**7))



def test_npz_header_with_an_unclosed_bracket_refused(tmp_path: Path) -> None:
    # numpy tokenizes the header dict: an unclosed bracket raised tokenize.TokenError (no ValueError), a 500
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY\x01\x00" + (20).to_bytes(2, "little") + b"{'descr': [[[[[[[[[\n")
        zf.writestr("y.npy", b"")
    with pytest.raises(DataFormatError, match="array 'x.npy' has an unreadable header"):
        load_image_set(path)


def test_zip_total_pixel_budget(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {f"0/{i}.png": _png((16, 16)) for i in range(5)})
    with pytest.raises(DataFormatError, match="5 images of 16x16 hold 1280 pixels together, over the limit of 1000"):
        load_image_set(path, limits=DataLimits(max_total_pixels=1000))
    assert len(load_image_set(path, limits=DataLimits(max_total_pixels=1280))) == 5


def test_zip_decoded_ratio_budget(tmp_path: Path) -> None:
    # one-colour PNGs stored in the zip: each member's own ratio is 1, but the pixels expand far more
    path = _zip(tmp_path / "d.zip", {f"0/{i}.png": _png((256, 256)) for i in range(4)}, zipfile.ZIP_STORED)
    with pytest.raises(DataFormatError, match=r"zip's images expands \d+-fold"):
        load_image_set(path, limits=DataLimits(ratio_slack_bytes=0))
    assert load_image_set(path).x.shape == (4, 256, 256, 3)


def test_zip_decodes_into_one_array_mixed_modes(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", {"0/a.png": _png(mode="L", value=9), "1/b.png": _png(value=5)})
    data = load_image_set(path)
    assert data.x.shape == (2, 6, 8, 3) and data.x.flags.c_contiguous
    assert data.x[0, 0, 0].tolist() == [9, 9, 9] and data.x[1, 0, 0].tolist() == [5, 10, 15]



def test_zip_png_inflated_ancillary_chunks_never_reach_pil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 200 iCCP and 200 keyword-less zTXt chunks of 1 KiB each: PIL inflated every one to 1 MiB on the header
    # read and again on the decode (0.9 s for a 210 kB image, an hour of the API's time for a 1 GiB part)
    from PIL import PngImagePlugin

    inflated: list[int] = []
    real = PngImagePlugin._safe_zlib_decompress
    monkeypatch.setattr(PngImagePlugin, "_safe_zlib_decompress", lambda s: inflated.append(len(s)) or real(s))
    comp = zlib.compress(bytes(2**20 - 1), 9)
    extra = b"".join(_png_chunk(b"iCCP", b"p\0\0" + comp) + _png_chunk(b"zTXt", b"\0\0" + comp) for _ in range(200))
    plain = _png(mode="L", value=9)
    bomb = plain[:33] + extra + plain[33:]  # after IHDR (8-byte signature, 25-byte chunk)
    data = load_image_set(_zip(tmp_path / "d.zip", {"0/a.png": bomb, "1/b.png": plain}, zipfile.ZIP_STORED))
    assert inflated == [] and data.x[:, 0, 0, 0].tolist() == [9, 9]


def _jpeg(progressive: bool, exif: bytes = b"") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(np.random.default_rng(0).integers(90, 140, (64, 64), dtype=np.uint8), "L")
    img.save(buf, "JPEG", progressive=progressive, quality=30, exif=exif)
    return buf.getvalue()


def test_jpeg_scans_are_counted_by_segments_not_bytes() -> None:
    """PIL writes a baseline JPEG as one scan and a progressive grey one as 6; 0xFF 0xDA bytes in an APP1
    payload are no scan."""
    from core.data.image_folder import jpeg_scans

    assert jpeg_scans(_jpeg(False), 100) == 1
    assert jpeg_scans(_jpeg(True), 100) == 6
    assert jpeg_scans(_jpeg(True, exif=b"Exif\0\0" + b"\xff\xda" * 300), 100) == 6


def test_zip_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path: Path) -> None:
    # each scan costs the decoder a pass over every block however few bytes it takes: 10,000 copies of a
    # 12-byte scan made a 145 kB 1000x1000 JPEG cost 0.6 s (an hour of the API's time per GiB); here 300 copies
    # of the progressive image's smallest scan, refused by count before PIL reads a pixel
    plain = _jpeg(True)
    starts = [i for i in range(len(plain) - 1) if plain[i] == 0xFF and plain[i + 1] == 0xDA]
    scans = [plain[a:b] for a, b in zip(starts, [*starts[1:], len(plain) - 2], strict=True)]
    bomb = plain[:-2] + min(scans, key=len) * 300 + plain[-2:]
    path = _zip(tmp_path / "d.zip", {"0/a.jpg": bomb, "1/b.jpg": plain})
    with pytest.raises(DataFormatError, match="'0/a.jpg' has more than 100 scans"):
        load_image_set(path)
    assert len(load_image_set(_zip(tmp_path / "ok.zip", {"0/a.jpg": plain, "1/b.jpg": _jpeg(False)}))) == 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize(
    ("folder", "num_classes", "message"),
    [("99999999999999999999", None, "class folder '99999999999999999999' names class index"),
     ("99999999999999999999", 10, "not below num_classes=10"),
     ("9" * 5000, None, "class folder '9999"),
     ("4294967296", None, "not below 2147483648"),
     ("01", None, "class folders '01' and '1' name the same class index 1")],
)
def test_zip_class_index_folders_bounded(tmp_path: Path, folder: str, num_classes: int | None, message: str) -> None:
    path = _zip(tmp_path / "d.zip", {"1/a.png": _png(), f"{folder}/b.png": _png()})
    with pytest.raises(DataFormatError, match=message):
        load_image_set(path, num_classes=num_classes)


def test_zip_unknown_method_and_encryption(tmp_path: Path) -> None:
    base = {"0/a.png": _png(), "0/b.png": _png()}
    path = hf.patch_zip_member(_zip(tmp_path / "m.zip", base, zipfile.ZIP_STORED), "0/b.png", method=77)
    with pytest.raises(DataFormatError, match="'0/b.png' uses the unknown zip compression method 77"):
        load_image_set(path)
    path = hf.patch_zip_member(_zip(tmp_path / "e.zip", base, zipfile.ZIP_STORED), "0/a.png", flag_bits=1)
    with pytest.raises(DataFormatError, match="'0/a.png' is encrypted"):
        load_image_set(path)


def test_settings_feed_every_data_limit() -> None:
    from store.settings import Settings

    limits = DataLimits(**Settings(max_zip_ratio=50, max_total_pixels=123, max_pickle_globals=7).data_limits())
    assert (limits.max_compression_ratio, limits.max_total_pixels) == (50, 123)
    assert limits.checkpoint.max_pickle_globals == 7
