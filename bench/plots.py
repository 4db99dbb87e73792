"""The benchmark's results as pictures: ``python -m bench.plots [results.json] [--out docs/images]``.

``make bench`` runs it after the table, on the bench/results.json it just wrote. One PNG per group:

- ``bench-throughput.png``: saturation throughput of every path, mediator's variants (auth, tracing,
  workers, ...) beside the direct clients of the brokers it sits between (the ceilings) and the peers
  (Node-RED, RabbitMQ's MQTT plugin) measured in the same rounds;
- ``bench-latency.png``: end-to-end latency percentiles (p50, p99, max) at the fixed load, per path.

Each picture names the machine and the date of the run it shows. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"mediator": "#2b6cb0", "variant": "#90b4e0", "ceiling": "#718096", "peer": "#dd8a3e"}


def _cells(entry: dict[str, Any], ceilings: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(label, kind, msgs/s) for one path: mediator first, its variants, the ceilings, the peers."""
    rows: list[tuple[str, str, float]] = []
    for key, cell in entry.items():
        if not key.startswith("mediator") or not isinstance(cell, dict):
            continue
        thr = cell.get("throughput_msgs_s")
        if isinstance(thr, int | float):
            rows.append((str(cell.get("system", key)), "mediator" if key == "mediator" else "variant", float(thr)))
    for name in entry.get("ceilings", []):
        cell = ceilings.get(name) or {}
        thr = cell.get("throughput_msgs_s")
        if isinstance(thr, int | float):
            rows.append((str(cell.get("system", name)).split(":")[0] + f" ({name})", "ceiling", float(thr)))
    for cell in (entry.get("peers") or {}).values():
        thr = cell.get("throughput_msgs_s") if isinstance(cell, dict) else None
        if isinstance(thr, int | float):
            rows.append((str(cell.get("system", "peer")).split(" (")[0], "peer", float(thr)))
    return rows


def _stamp(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    machine = meta.get("machine") or {}
    cpus = machine.get("cpus", "?")
    when = str(meta.get("started", "?"))[:10]
    return f"{when}, {cpus} cores, Python {machine.get('python', '?')}, kernel {machine.get('kernel', '?')}"


def throughput(results: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    paths = results.get("paths", {})
    ceilings = results.get("ceilings", {})
    groups = [(entry.get("title", name), _cells(entry, ceilings)) for name, entry in paths.items()]
    groups = [(title, rows) for title, rows in groups if rows]
    heights = [max(1, len(rows)) for _, rows in groups]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(9, 0.32 * sum(heights) + 1.1 * len(groups)), gridspec_kw={"height_ratios": heights}
    )
    axes = [axes] if len(groups) == 1 else list(axes)
    top = max((thr for _, rows in groups for _, _, thr in rows), default=1.0)
    for ax, (title, rows) in zip(axes, groups, strict=True):
        labels = [label for label, _, _ in rows][::-1]
        values = [thr for _, _, thr in rows][::-1]
        colours = [COLOURS[kind] for _, kind, _ in rows][::-1]
        bars = ax.barh(labels, values, color=colours)
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:,.0f}", va="center", fontsize=7)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlim(0, top * 1.18)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("messages per second at saturation (higher is better)", fontsize=8)
    fig.suptitle(f"mediator throughput by path: {_stamp(results)}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    target = out / "bench-throughput.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def latency(results: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    rows: list[tuple[str, dict[str, Any], float]] = []
    for name, entry in results.get("paths", {}).items():
        cell = entry.get("mediator") or {}
        lat = cell.get("latency_fixed_load")
        if isinstance(lat, dict):
            rows.append((str(entry.get("title", name)), lat, float(cell.get("fixed_load_msgs_s") or 0)))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4))
    labels = [f"{title} @ {rate:,.0f}/s" for title, _, rate in rows][::-1]
    ys = range(len(rows))
    for offset, (key, colour) in enumerate((("p50_ms", "#2b6cb0"), ("p99_ms", "#dd8a3e"), ("max_ms", "#a0aec0"))):
        values = [float(lat.get(key) or 0) for _, lat, _ in rows][::-1]
        ax.barh([y + (offset - 1) * 0.27 for y in ys], values, height=0.26, color=colour, label=key.removesuffix("_ms"))
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency at the fixed load, ms (log scale, lower is better)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.set_title(f"mediator latency percentiles: {_stamp(results)}", fontsize=9)
    fig.tight_layout()
    target = out / "bench-latency.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def draw(results_file: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    results = json.loads(results_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    return [throughput(results, out), latency(results, out)]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    a = ap.parse_args()
    for path in draw(Path(a.results), Path(a.out)):
        print(f"bench.plots: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
