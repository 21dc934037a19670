"""GRPO from the SFT base: accuracy before and after `rlx train experiment=grpo_tiny`.

    python scripts/bench_grpo.py            # needs the SFT base (`make base`); ~6 min on 2 CPU cores

Evaluates the cached tiny SFT base and the GRPO run's final checkpoint on the same
validation (256) and test (512) problems with greedy decoding, and reports the difference
with its binomial standard error, so a lift inside the noise reads as such. Writes
docs/results/bench_grpo.json and the "GRPO from the SFT base" section of docs/RESULTS.md.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, ROOT, machine, now, write_section  # noqa: E402

from rlx.config import build, compose_config  # noqa: E402
from rlx.evaluate import evaluate  # noqa: E402
from rlx.models import hf  # noqa: E402
from rlx.state import find_checkpoint  # noqa: E402
from rlx.tasks import run_training  # noqa: E402

HEADING = "## GRPO from the SFT base (bench_grpo)"
SPLITS = {"validation": 256, "test": 512}


def accuracy(model, tokenizer, task) -> dict:
    return {s: evaluate(model, tokenizer, task, s, n, 64, 160, 512)["eval/accuracy"] for s, n in SPLITS.items()}


def stderr(p: float, q: float, n: int) -> float:
    """Standard error of the difference of two accuracies on the same n problems (treated as independent)."""
    return math.sqrt(p * (1 - p) / n + q * (1 - q) / n)


def main() -> None:
    cfg = compose_config("train", ["experiment=grpo_tiny", "trainer.progress=false"])
    base = build(cfg.model)
    task = build(cfg.data)
    before = accuracy(base.model, base.tokenizer, task)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run_training(cfg, Path(run_dir))
        tuned = hf(str(find_checkpoint(run_dir)), dtype="float32", device="cpu")
        after = accuracy(tuned.model, tuned.tokenizer, task)
    result = {"date": now(), "machine": machine(), "command": "python scripts/bench_grpo.py",
              "before": before, "after": after, "steps": summary["steps"], "train_time_s": summary["train/time_s"],
              "stderr": {s: stderr(before[s], after[s], n) for s, n in SPLITS.items()}}
    out = ROOT / "docs" / "results" / "bench_grpo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {s} ({n}) | {before[s]:.1%} | {after[s]:.1%} | {after[s] - before[s]:+.1%} +- {result['stderr'][s]:.1%} |"
            for s, n in SPLITS.items()]
    m = result["machine"]
    section = "\n".join([
        HEADING, "",
        f"`rlx train experiment=grpo_tiny` ({result['steps']} steps, 32 prompts x 8 samples, lr 3e-5; "
        f"{result['train_time_s'] / 60:.1f} min of training) from the tiny SFT base; greedy accuracy on the same problems.",
        "", "| split | SFT base | after GRPO | difference +- s.e. |", "|---|---:|---:|---:|", *rows, "",
        f"- Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['device']}; torch {m['torch']}.",
        f"- Command: `{result['command']}` ({result['date']}).", ""])
    write_section(RESULTS, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
