"""The report's plots as PNG bytes (matplotlib, Agg: no display, no font or file from outside the service)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: a server has no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

METRICS = ("acc", "asr", "ra")
NWC_QUANTILES = ("q0", "q25", "q50", "q75", "q90", "q95", "q99", "q100")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def scores_png(report: dict[str, Any]) -> bytes | None:
    """ACC/ASR/RA before (and after a repair) as grouped bars; None when no score was measured."""
    phases = [p for p in ("before", "after") if isinstance(report.get(p), dict)]
    present = [m for m in METRICS if any(report[p].get(m) is not None for p in phases)]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        values = [report[phase].get(m) or 0.0 for m in present]
        xs = [j + (i - (len(phases) - 1) / 2) * width for j in range(len(present))]
        bars = ax.bar(xs, values, width, label=phase, color=("#b03a2e", "#1e8449")[i])
        ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=8)
    ax.set_xticks(range(len(present)), [m.upper() for m in present])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("scores before / after")
    return _png(fig)


def nwc_png(report: dict[str, Any]) -> bytes | None:
    """The neuron weight change distribution (its quantiles, the shape TSBD's report keeps); None without it."""
    summary = ((report.get("repair") or {}).get("details") or {}).get("nwc_summary")
    if not isinstance(summary, dict) or not all(q in summary for q in NWC_QUANTILES):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot([int(q[1:]) for q in NWC_QUANTILES], [summary[q] for q in NWC_QUANTILES], marker="o")
    ax.set_xlabel("percentile of channels")
    ax.set_ylabel("NWC")
    ax.set_title(f"NWC distribution ({summary.get('num_channels', '?')} channels, gini "
                 f"{summary.get('gini', 0.0):.2f})")
    return _png(fig)


def sweep_png(report: dict[str, Any]) -> bytes | None:
    """Clean accuracy against the zeroed fraction n (TSBD's automatic choice of n); None without a sweep."""
    auto = ((report.get("repair") or {}).get("details") or {}).get("auto")
    points = auto.get("sweep") if isinstance(auto, dict) else None
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot([p["n"] for p in points], [p["accuracy"] for p in points], marker="o", label="clean accuracy")
    if auto.get("n") is not None:
        ax.axvline(auto["n"], color="#b03a2e", linestyle="--", label=f"chosen n = {auto['n']:g}")
    ax.set_xlabel("fraction of channels zeroed (n)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("zeroing sweep")
    return _png(fig)


FIGURES: dict[str, Callable[[dict[str, Any]], bytes | None]] = {
    "scores": scores_png, "nwc": nwc_png, "sweep": sweep_png}


def available(report: dict[str, Any]) -> list[str]:
    """The figure names this report has data for (cheap: no drawing)."""
    repair_details = (report.get("repair") or {}).get("details") or {}
    names = []
    if any(isinstance(report.get(p), dict) and any(report[p].get(m) is not None for m in METRICS)
           for p in ("before", "after")):
        names.append("scores")
    if isinstance(repair_details.get("nwc_summary"), dict):
        names.append("nwc")
    if isinstance(repair_details.get("auto"), dict) and repair_details["auto"].get("sweep"):
        names.append("sweep")
    return names
