"""Training curves from metrics.jsonl: one panel per metric, one line per run.

    rlx plot outputs/2026-11-27/12-00-00                 # train/loss and the eval metrics
    rlx plot multirun/2026-11-27/12-00-00/*  --keys train/loss,eval/accuracy
"""
from __future__ import annotations

import json
from pathlib import Path

from rlx.errors import RlxError

DEFAULT_KEYS = ("train/loss", "eval/accuracy", "eval/response_len", "eval/loss")


def read_metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        raise RlxError(f"{run} has no metrics.jsonl (is it a run folder?)")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def plot_runs(runs: list[Path], keys: list[str] | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    data = {run: read_metrics(run) for run in runs}
    present = {k for rows in data.values() for r in rows for k in r}
    keys = [k for k in (keys or DEFAULT_KEYS) if k in present]
    if not keys:
        raise RlxError(f"none of the metrics to plot are in these runs; they have: {', '.join(sorted(present - {'step'}))}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run, rows in data.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=run.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
