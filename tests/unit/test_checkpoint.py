"""Safe checkpoint loading: formats, hostile safetensors headers, pickles that try to run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core.models import (
    CheckpointError,
    UnsupportedFormatError,
    WeightsError,
    check_state_dict,
    create_model,
    load_checkpoint,
    save_safetensors,
)
from core.models.checkpoint import CheckpointLimits
from tests import hostile_files as hf


class _TouchCanary:
    """Pickles as a call that creates a file: loading must never make that call."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _OpenCanary:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("resnet20", 10).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_safetensors_round_trip(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "upload.tmp"
    save_safetensors(state_dict, path, metadata={"architecture": "resnet20"})
    loaded = load_checkpoint(path, filename="model.safetensors")
    assert loaded.format == "safetensors"
    assert loaded.meta == {"architecture": "resnet20"}
    _same(loaded.state_dict, state_dict)


def test_torch_state_dict_and_wrappers(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    for i, obj in enumerate([state_dict, {"state_dict": state_dict, "epoch": 3}, {"model": state_dict}]):
        path = tmp_path / f"m{i}.pt"
        torch.save(obj, path)
        loaded = load_checkpoint(path)
        assert loaded.format == "torch"
        _same(loaded.state_dict, state_dict)


def test_torch_file_without_state_dict_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_checkpoint(path)


def test_pickle_payload_refused_and_not_run(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict, "extra": _TouchCanary(canary)}, path)
    with pytest.raises(CheckpointError, match="refused: the file holds objects other than tensors"):
        load_checkpoint(path)
    assert not canary.exists()


def test_backdoorbench_result_extracted_without_running_payload(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    canary1, canary2 = tmp_path / "canary1", tmp_path / "canary2"
    result = {
        "model_name": "resnet20",
        "num_classes": 10,
        "model": state_dict,
        "data_path": "./data",
        "img_size": (32, 32, 3),
        "clean_data": "cifar10",
        "bd_train": {"x": np.zeros((2, 4), dtype=np.uint8), "hook": _TouchCanary(canary1)},
        "bd_test": _OpenCanary(canary2),
    }
    path = tmp_path / "attack_result.pt"
    torch.save(result, path)
    loaded = load_checkpoint(path, filename="attack_result.pt")
    assert not canary1.exists() and not canary2.exists()
    assert loaded.format == "backdoorbench"
    assert loaded.meta["model_name"] == "resnet20" and loaded.meta["num_classes"] == 10
    assert "posix.system" in loaded.meta["ignored_globals"]
    _same(loaded.state_dict, state_dict)
    check_state_dict("resnet20", 10, 3, loaded.state_dict)


def test_legacy_torch_file_refused(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "old.pt"
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsupportedFormatError, match="TorchScript"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.onnx", "model.pkl", "model.h5", "model"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / "upload"
    path.write_bytes(b"whatever")
    with pytest.raises(UnsupportedFormatError, match="unsupported checkpoint format"):
        load_checkpoint(path, filename=name)


def _safetensors_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _entry(begin: int, end: int, shape: list[int]) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02\x03", "truncated"),
        (_safetensors_bytes({"a": _entry(0, 4, [1])}, length=10_000), "exceeds the"),
        (_safetensors_bytes({"a": _entry(0, 4, [1])}, length=2**62), "exceeds the limit"),
        (_safetensors_bytes(b"{not json", b"\0" * 8), "not valid JSON"),
        (_safetensors_bytes([1, 2], b"\0" * 8), "must be a JSON object"),
        (_safetensors_bytes({"a": _entry(0, 400, [100])}, b"\0" * 8), "outside the 8-byte data section"),
        (_safetensors_bytes({"a": _entry(0, 8, [2]), "b": _entry(4, 12, [2])}, b"\0" * 12), "overlap"),
        (_safetensors_bytes({"a": _entry(0, 8, [3])}, b"\0" * 8), "needs 12"),
        (_safetensors_bytes({"a": {**_entry(0, 4, [1]), "dtype": "X9"}}, b"\0" * 4), "unknown dtype"),
        (_safetensors_bytes({"a": _entry(0, 4, [-1])}, b"\0" * 4), "invalid shape"),
        (_safetensors_bytes({}, b""), "no tensors"),
    ],
)
def test_hostile_safetensors_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_env_cannot_turn_weights_only_off(
    tmp_path: Path, state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict, "extra": _OpenCanary(canary)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not canary.exists()


class _StorageRef:
    """Pickled through persistent_id as torch does for a storage."""

    def __init__(self, numel: int) -> None:
        self.numel = numel


class _BadTensor:
    def __init__(self, storage: _StorageRef, size: tuple[int, ...], stride: tuple[int, ...] = (1,)) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, {}))


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _torch_like_zip(path: Path, obj: object, numel: int, compression: int = zipfile.ZIP_STORED) -> Path:
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", bytes(4 * numel))
    return path


def test_backdoorbench_tensor_past_storage_refused(tmp_path: Path) -> None:
    storage = _StorageRef(4)
    result = {"model": {"w": _BadTensor(storage, (1000,))}, "model_name": "x", "bd_train": None}
    path = _torch_like_zip(tmp_path / "attack_result.pt", result, 4)
    with pytest.raises(CheckpointError, match="past the end of its storage"):
        load_checkpoint(path)


def test_backdoorbench_storage_size_checked(tmp_path: Path) -> None:
    storage = _StorageRef(1_000_000)  # claims more elements than the record holds
    result = {"model": {"w": _BadTensor(storage, (4,))}, "model_name": "x", "bd_train": None}
    path = _torch_like_zip(tmp_path / "attack_result.pt", result, 4)
    with pytest.raises(CheckpointError, match="storage '0' has 16 bytes, expected 4000000"):
        load_checkpoint(path)


def test_backdoorbench_hand_built_archive_loads(tmp_path: Path) -> None:
    tensor = _BadTensor(_StorageRef(4), (4,))
    result = {"model": {"w": tensor}, "num_classes": 2, "bd_test": _OpenCanary(tmp_path / "c")}
    loaded = load_checkpoint(_torch_like_zip(tmp_path / "attack_result.pt", result, 4))
    assert loaded.format == "backdoorbench" and loaded.meta["num_classes"] == 2
    assert torch.equal(loaded.state_dict["w"], torch.zeros(4))
    assert not (tmp_path / "c").exists()


def test_backdoorbench_repeated_view_refused(tmp_path: Path) -> None:
    # stride 0 makes 10**9 elements out of one: whole-tensor operations later would allocate gigabytes
    result = {"model": {"w": _BadTensor(_StorageRef(4), (10**9,), (0,))}, "model_name": "x"}
    with pytest.raises(CheckpointError, match="more elements than its storage"):
        load_checkpoint(_torch_like_zip(tmp_path / "attack_result.pt", result, 4))


def test_a_flood_of_archive_records_is_refused_before_zipfile_builds_them(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from core.models.checkpoint import archive

    monkeypatch.setattr(archive, "MAX_ARCHIVE_RECORDS", 100)
    monkeypatch.setattr(archive.zipfile, "ZipFile", None)  # never reached
    with pytest.raises(CheckpointError, match="has at least 101 records, over the limit of 100"):
        load_checkpoint(hf.directory_flood_zip(tmp_path / "m.pt", 1000))


def test_compressed_records_refused(tmp_path: Path) -> None:
    result = {"model": {"w": _BadTensor(_StorageRef(4), (4,))}, "model_name": "x"}
    path = _torch_like_zip(tmp_path / "attack_result.pt", result, 4, zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="is compressed"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------- issue 8: hostile containers


def _hand_built(tmp_path: Path, obj: object, name: str = "m.pt") -> Path:
    return hf.backdoorbench_zip(tmp_path / name, hf.torch_pickle(obj))


def test_ordered_dict_build_cannot_shadow_its_methods(tmp_path: Path) -> None:
    # torch's weights_only unpickler lets BUILD set attributes on an OrderedDict: get/items/keys would then
    # be ints, and any code calling them would crash; every path reads through the dict class instead
    w = hf.RawTensor(hf.StorageRef(4), (4,))
    cases = {
        "torch": hf.ShadowedOrderedDict({"w": w}),
        "torch_wrapped": {"state_dict": hf.ShadowedOrderedDict({"w": w})},
        "backdoorbench": {"model": hf.ShadowedOrderedDict({"w": w}), "model_name": "x"},
        "backdoorbench_top": hf.ShadowedOrderedDict({"model": {"w": w}, "num_classes": 2}),
    }
    for name, obj in cases.items():
        loaded = load_checkpoint(_hand_built(tmp_path, obj, f"{name}.pt"))
        assert loaded.format == name.split("_")[0], name
        assert type(loaded.state_dict) is dict and list(loaded.state_dict) == ["w"], name
        assert torch.equal(loaded.state_dict["w"], torch.zeros(4)), name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unusable_tensors_refused_naming_the_key(tmp_path: Path) -> None:
    cases = {
        "meta": (torch.empty(3, device="meta"), "tensor 'b' is on the 'meta' device"),
        "sparse": (torch.eye(3).to_sparse(), "tensor 'b' has the sparse_coo layout"),
        "csr": (torch.eye(3).to_sparse_csr(), "tensor 'b' has the sparse_csr layout"),
        "complex": (torch.zeros(3, dtype=torch.complex64), "unsupported type torch.ComplexFloatStorage"),
    }
    for name, (tensor, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"a": torch.zeros(2), "b": tensor}, path)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    path = tmp_path / "meta.safetensors"
    save_safetensors({"a": torch.zeros(2, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(CheckpointError, match="tensor 'a' has the unsupported dtype float8_e4m3fn"):
        load_checkpoint(path)


def test_check_state_dict_refuses_meta_and_integer_weights(state_dict: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        meta = create_model("resnet20", 10).state_dict()
    with pytest.raises(WeightsError, match=r"unusable tensors: \d+ tensors: conv1.weight is on the 'meta'"):
        check_state_dict("resnet20", 10, 3, meta)
    ints = dict(state_dict, **{"fc.weight": state_dict["fc.weight"].to(torch.int32)})
    with pytest.raises(WeightsError, match="fc.weight expected torch.float32, got torch.int32"):
        check_state_dict("resnet20", 10, 3, ints)


def test_one_shared_placeholder_for_every_global(tmp_path: Path) -> None:
    from core.models.checkpoint.backdoorbench import Inert, SafeUnpickler

    path = hf.backdoorbench_zip(tmp_path / "g.pt", hf.many_globals_pickle(3))
    with zipfile.ZipFile(path) as zf:
        unpickler = SafeUnpickler(zf, "archive/", b"", read_storages=False, limits=CheckpointLimits())
        assert unpickler.find_class("a", "B") is unpickler.find_class("c", "D") is Inert
        assert unpickler.ignored == {"a.B", "c.D"}
    loaded = load_checkpoint(path)
    assert loaded.meta["ignored_globals"] == ["evil_module_0.Name0", "evil_module_1.Name1", "evil_module_2.Name2"]
    assert loaded.findings() == {"ignored_globals": loaded.meta["ignored_globals"], "ignored_globals_count": 3}
    assert load_checkpoint(hf.small_state_dict_zip(tmp_path / "plain.pt")).findings() == {}


def test_hostile_pickle_errors_become_checkpoint_errors(tmp_path: Path) -> None:
    w = hf.RawTensor(hf.StorageRef(4), (4,))
    head = hf.torch_pickle({"model": {"w": w}, "model_name": "x"})[:-1]
    bodies = {
        "truncated": head[:-7],
        "dict_build": head + b"}b.",  # BUILD with a dict state on the top-level dict
        "bad_persistent": head + b"X\x01\x00\x00\x00kX\x01\x00\x00\x00zQs.",
        "deep": b"\x80\x02" + b"]" * 100_000 + b".",
    }
    storage = hf.StorageRef(4)
    for i, state in enumerate([(storage, 0, (10**6,), (0,)), (storage, 0, (100,), (1,)), {"a": 1, "b": 2, "c": 3},
                               {"requires_grad": True}]):
        bodies[f"tensor_build_{i}"] = hf.torch_pickle({"model": {"w": hf.StatefulTensor(storage, (4,), state)},
                                                      "model_name": "x"})
    for name, body in bodies.items():
        with pytest.raises(CheckpointError):
            load_checkpoint(hf.backdoorbench_zip(tmp_path / f"{name}.pt", body))


def test_archive_declaring_more_than_the_file_holds(tmp_path: Path) -> None:
    path = hf.small_state_dict_zip(tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
    # the central directory claims 1 GB for a 16-byte record (both sizes, so it still looks "stored")
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + n]) == info.filename.encode():
            struct.pack_into("<II", data, pos + 20, 2**30, 2**30)
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="declare|unreadable|not a readable"):
        load_checkpoint(path)


@pytest.mark.parametrize("module", [b"evil\x00module", b"evil\x1bmodule"])
def test_a_global_named_with_a_control_character_is_refused(tmp_path: Path, module: bytes) -> None:
    """A BackdoorBench result may name any global (each is made inert), and the names go into the report's
    file_findings and ignored_globals: a NUL passed the upload and failed the finished scan's write into
    PostgreSQL's jsonb, after the whole run."""
    from core.models.checkpoint.inspect import inspect_checkpoint

    head = hf.torch_pickle({"model": {"w": hf.RawTensor(hf.StorageRef(4), (4,))}, "model_name": "x"})
    path = hf.backdoorbench_zip(tmp_path / "bb.pt", head[:-1] + b"X\x08\x00\x00\x00bd_train](c" + module
                                + b"\nName\nes.")
    for load in (inspect_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="names a global with a control character"):
            load(path)
