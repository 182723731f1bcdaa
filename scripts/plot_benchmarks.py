#!/usr/bin/env python3
"""Draw prefill and generation tok/s per benchmark entry (from results/benchmarks.jsonl) to a PNG.

    python scripts/plot_benchmarks.py                       # every entry -> results/benchmarks.png
    python scripts/plot_benchmarks.py --title "Fused WKV Kernel" --out results/fused-wkv.png

Bars are medians, whiskers the min-max over runs; each bar is labelled with its
entry's change and coloured by device, so CPU and GPU figures are never mixed up.
Rejected runs (quality gate) carry no speed and are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import rwkv_mlx  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mlx.bench.record import load_entries


def plot(entries: list[dict], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({e.get("device", "?") for e in entries})
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(devices)}
    labels = [f"{i}. {e.get('change', '')[:40]}\n[{e.get('engine', 'rwkv-mlx')}] {e.get('model', '')}"
              for i, e in enumerate(entries, start=1)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(entries) + 4), 5.5), squeeze=False)
    for ax, key, name in ((axes[0][0], "prefill_tps", "prefill"), (axes[0][1], "generation_tps", "generation")):
        medians = [e[key] for e in entries]
        low = [e[key] - e.get(f"{key}_min", e[key]) for e in entries]
        high = [e.get(f"{key}_max", e[key]) - e[key] for e in entries]
        ax.bar(range(len(entries)), medians, yerr=[low, high], capsize=3,
               color=[colours[e.get("device", "?")] for e in entries])
        ax.set_xticks(range(len(entries)), labels, rotation=60, ha="right", fontsize=7)
        wide = max(medians) > 20 * min(medians)  # CPU and GPU entries together: a log axis keeps both readable
        if wide:
            ax.set_yscale("log")
        ax.set_ylabel(f"tok/s (median, min-max){', log scale' if wide else ''}")
        ax.set_title(f"{name} ({entries[0].get('prompt_tokens')} prompt / {entries[0].get('gen_tokens')} generated tokens)"
                     if len({(e.get("prompt_tokens"), e.get("gen_tokens")) for e in entries}) == 1 else name)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[d]) for d in devices]
    fig.legend(handles, devices, loc="upper right", fontsize=8, title="device")
    fig.suptitle(title or "rwkv-mlx benchmark log")
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Plot tok/s per benchmark entry to a PNG.")
    ap.add_argument("--title", default=None, help="only this title's entries (default: all)")
    ap.add_argument("--results-dir", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default RESULTS_DIR/benchmarks.png)")
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print("plot_benchmarks: error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    entries = [e for e in load_entries(a.results_dir, a.title) if "prefill_tps" in e]
    if not entries:
        where = a.results_dir / "benchmarks.jsonl"
        print(f"plot_benchmarks: error: no entries{f' titled {a.title!r}' if a.title else ''} in {where}", file=sys.stderr)
        return 2
    out = plot(entries, a.out or a.results_dir / "benchmarks.png", a.title)
    print(f"wrote {out} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
