"""``antidote demo``: the whole service on the embedded default, with a model that really has a backdoor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from cli import client
from core.data.imageset import ImageSet
from core.data.transforms import Normalization

DIGITS_NORM = Normalization((0.5,), (0.5,))
# augmentation on: crop padding scales to the 8x8 side (1 pixel) and flips are off because the model says a
# mirrored digit is another digit (core/defenses/tsbd/finetune.py); it needed "augment": false before issue 10
DEMO_REPAIR_PARAMS = {"batch_size": 32}
DIGITS_MODEL = {"architecture": "resnet20", "num_classes": 10, "in_channels": 1, "mean": [0.5], "std": [0.5]}


def load_digits() -> ImageSet:
    """The 1,797 real 8x8 handwritten digits that ship inside scikit-learn, as uint8 N×8×8×1."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)[..., None]
    return ImageSet(x, d.target.astype(np.int64))


def backdoored_digits_model(epochs: int = 8, seed: int = 0) -> tuple[dict[str, torch.Tensor], ImageSet, ImageSet]:
    """A ResNet-20 trained on digits with 10% BadNets poisoning to class 0.

    Returns (state dict, a 300-image clean subset the defender holds, a 297-image clean test set)."""
    from core.attacks import poison_training_set
    from core.attacks.registry import create_attack
    from core.models.registry import create_model
    from core.training import train_classifier

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data))
    train, clean, test = data.subset(order[:1200]), data.subset(order[1200:1500]), data.subset(order[1500:])
    attack = create_attack("badnets", target=0, image_shape=train.image_shape)
    poisoned = poison_training_set(attack, train, 0.1, 10, seed=seed).data
    torch.manual_seed(seed)
    model = create_model("resnet20", 10, 1)
    train_classifier(model, poisoned, DIGITS_NORM, epochs=epochs, lr=0.05, batch_size=64, device="cpu",
                     augment=False, seed=seed)
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, clean, test


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(data_dir: Path, port: int) -> int:
    from core.models.checkpoint import save_safetensors
    from core.pipeline import available_modes

    console = Console()
    shutil.rmtree(data_dir, ignore_errors=True)
    files_dir = data_dir / "inputs"
    files_dir.mkdir(parents=True)
    console.rule("1. a model with a backdoor")
    console.print("training ResNet-20 on scikit-learn's 8x8 digits, 10% BadNets poisoning to class 0 …")
    t0 = time.perf_counter()
    state, clean, test = backdoored_digits_model()
    console.print(f"trained in {time.perf_counter() - t0:.0f} s")
    model_path = files_dir / "model.safetensors"
    save_safetensors(state, model_path)
    np.savez(files_dir / "clean.npz", x=clean.x, y=clean.y)
    np.savez(files_dir / "test.npz", x=test.x, y=test.y)

    console.rule("2. antidote serve (embedded: SQLite, folder broker, local files)")
    port = _free_port(port)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ANTIDOTE_DATA_DIR": str(data_dir / "state"), "ANTIDOTE_LOG_JSON": "false",
           "ANTIDOTE_LOG_LEVEL": "WARNING"}
    for name in ("ANTIDOTE_DATABASE_URL", "ANTIDOTE_BROKER_URL", "ANTIDOTE_STORAGE_URL"):
        env.pop(name, None)
    log = open(data_dir / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, server, data_dir / "serve.log")
        key = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "--tenant", "demo"], env=env,
                             check=True, capture_output=True, text=True).stdout.strip()
        console.print(f"serving on {url}; API key created for tenant 'demo'")
        inputs = {"model": model_path, "clean_data": files_dir / "clean.npz", "test_data": files_dir / "test.npz"}
        modes = ["scan", *(["repair"] if "repair" in available_modes() else [])]
        for step, mode in enumerate(modes, start=3):
            console.rule(f"{step}. {mode}")
            spec = {"mode": mode, "model": DIGITS_MODEL, "attack": {"type": "badnets", "target": 0}}
            if mode == "repair":
                # 8x8 digits: CIFAR's crop-by-4 and flips destroy them, and 240 images make one batch of 256
                spec["repair"] = {"method": "tsbd", "params": DEMO_REPAIR_PARAMS}
            scan_id = client.submit(url, key, spec, inputs)
            final = client.wait(url, key, scan_id, 1800, console)
            if final["status"] != "succeeded":
                console.print(f"[red]{mode} {final['status']}: {escape(str(final['error']))}[/red]")
                return 2
            report = client.fetch_report(url, key, scan_id)
            for line in client.summary_lines(report):
                console.print(line, markup=False)
            (data_dir / f"{mode}-report.json").write_text(json.dumps(report, indent=2))
            if mode == "repair":
                client.download_artifact(url, key, scan_id, "repaired_model", data_dir / "repaired_model.safetensors")
                console.print(f"repaired weights: {data_dir / 'repaired_model.safetensors'}")
        console.rule("done")
        console.print(f"reports under {data_dir}; the server log is {data_dir / 'serve.log'}")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not get ready within 120 s")
