"""Shared by the benchmark scripts: the machine description, in-place rewriting of one `## `
section of docs/RESULTS.md, and saving a figure under docs/."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section under `heading` (up to the next `## ` heading), leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Results\n"
    lines = text.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [*section.splitlines(), ""]  # the blank line keeps the next heading apart
    else:
        lines += ["", *section.splitlines()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def publish(heading: str, section: str) -> None:
    """Write `section` under `heading` in docs/RESULTS.md and print it."""
    write_section(RESULTS, heading, section)
    print(section)


def save_figure(fig, name: str) -> None:
    """docs/<name> at the resolution every benchmark plot uses; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(ROOT / "docs" / name, dpi=120)
    plt.close(fig)


def record(path: Path, **fields) -> dict:
    """Write a benchmark's results to `path` with the command, date and machine that produced them
    (after every run, so nothing is lost if the benchmark is stopped); returns what was written."""
    result = {"command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "date": now(),
              "machine": machine(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
