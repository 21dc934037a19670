"""Accuracy lift of online RL over the SFT base: `rlx train experiment=<algo>_tiny` for GRPO and PPO.

    python scripts/bench_rl_lift.py                      # needs the SFT base (`make base`); ~15 min on 2 CPU cores
    python scripts/bench_rl_lift.py --algos grpo --steps 50 -- optimizer.lr=5e-5

Each run starts from the cached tiny SFT base. The base and each run's final checkpoint answer
the same 768 held-out problems (validation 256 + test 512) greedily, and the lift is reported
as a paired difference: the mean of (after - before) per problem with its standard error
sd / sqrt(n), which is much tighter than comparing two independent accuracies because most
problems are answered alike before and after. A lift more than two standard errors from zero
is marked as significant. Also reported: the sampled training accuracy (at the run's
temperature) of the first and last logging windows. Writes docs/results/bench_rl_lift.json
(runs of earlier invocations with other algorithms or overrides are kept) and the "RL accuracy
lift" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, ROOT, machine, now, write_section  # noqa: E402

from rlx.config import build, compose_config  # noqa: E402
from rlx.evaluate import answers  # noqa: E402
from rlx.models import hf  # noqa: E402
from rlx.state import find_checkpoint  # noqa: E402
from rlx.tasks import run_training  # noqa: E402

HEADING = "## RL accuracy lift over the SFT base (bench_rl_lift)"
SPLITS = {"validation": 256, "test": 512}


def correctness(model, tokenizer, task) -> dict[str, list[bool]]:
    return {s: answers(model, tokenizer, task, list(task.split(s))[:n], 64, 160)[0] for s, n in SPLITS.items()}


def paired(before: list[bool], after: list[bool]) -> tuple[float, float]:
    """Mean per-problem difference and its standard error."""
    d = [float(a) - float(b) for b, a in zip(before, after, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def sampled_accuracy(run_dir: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = [r["rl/accuracy"] for r in rows if "rl/accuracy" in r]
    return acc[0], acc[-1]


def run(algo: str, overrides: list[str], base: dict, task) -> dict:
    cfg = compose_config("train", [f"experiment={algo}_tiny", "trainer.progress=false", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run_training(cfg, Path(run_dir))
        tuned = hf(str(find_checkpoint(run_dir)), dtype="float32", device="cpu")
        after = correctness(tuned.model, tuned.tokenizer, task)
        first, last = sampled_accuracy(Path(run_dir))
    both_b = [x for s in SPLITS for x in base[s]]
    both_a = [x for s in SPLITS for x in after[s]]
    lift, se = paired(both_b, both_a)
    return {
        "algo": algo, "overrides": overrides, "steps": summary["steps"], "train_time_s": summary["train/time_s"],
        "accuracy": {s: sum(after[s]) / len(after[s]) for s in SPLITS},
        "accuracy_all": sum(both_a) / len(both_a), "lift": lift, "lift_se": se, "significant": abs(lift) > 2 * se,
        "sampled_accuracy_first": first, "sampled_accuracy_last": last,
    }


def render(result: dict) -> str:
    base, n = result["base"], sum(SPLITS.values())
    rows = [f"| SFT base | - | {base['validation']:.1%} | {base['test']:.1%} | {base['all']:.1%} | - | - |"]
    for r in result["runs"]:
        sig = " (significant)" if r["significant"] else ""
        train = " ".join(["rlx train", f"experiment={r['algo']}_tiny", *r["overrides"]])
        rows.append(f"| `{train}` |" +
                    f" {r['steps']} steps, {r['train_time_s'] / 60:.1f} min | {r['accuracy']['validation']:.1%} | "
                    f"{r['accuracy']['test']:.1%} | {r['accuracy_all']:.1%} | "
                    f"**{r['lift']:+.1%} +- {r['lift_se']:.1%}**{sig} | "
                    f"{r['sampled_accuracy_first']:.1%} -> {r['sampled_accuracy_last']:.1%} |")
    m = result["machine"]
    commands = ", ".join(sorted({f"`{r['command']}`" for r in result["runs"]}))
    return "\n".join([
        HEADING, "",
        f"Greedy accuracy on the same {n} held-out problems (validation 256 + test 512) before and after RL from the "
        "tiny SFT base; the lift is the paired per-problem difference +- its standard error (significant: beyond "
        "2 s.e.). The last column is the sampled accuracy of the training rollouts (at the run's temperature), first "
        "and last logging window.", "",
        "| run | training | validation | test | all | lift (paired) | sampled acc. in training |",
        "|---|---|---:|---:|---:|---:|---:|", *rows, "",
        f"- Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['device']}; torch {m['torch']}.",
        f"- Commands: {commands} (last run {result['date']}).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=["grpo", "ppo"], help="experiments <algo>_tiny to run")
    parser.add_argument("--steps", type=int, help="override trainer.max_steps")
    parser.add_argument("overrides", nargs="*", help="more config overrides for every run (after --)")
    args = parser.parse_args()
    overrides = [*([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.overrides]
    cfg = compose_config("train", ["experiment=grpo_tiny"])
    policy, task = build(cfg.model), build(cfg.data)
    base = correctness(policy.model, policy.tokenizer, task)
    base_acc = {s: sum(v) / len(v) for s, v in base.items()}
    base_acc["all"] = sum(sum(v) for v in base.values()) / sum(len(v) for v in base.values())
    runs = [run(algo, overrides, base, task) for algo in args.algos]
    out = ROOT / "docs" / "results" / "bench_rl_lift.json"
    # Runs of other (algo, overrides) from earlier invocations stay in the table; reruns replace theirs.
    key = lambda r: (r["algo"], tuple(r["overrides"]))
    earlier = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in earlier if key(r) not in {key(n) for n in runs}] + runs
    command = " ".join(["python scripts/bench_rl_lift.py", *sys.argv[1:]])
    for r in runs:
        r.setdefault("command", command)
    result = {"date": now(), "machine": machine(), "base": base_acc, "runs": runs}
    out.write_text(json.dumps(result, indent=2) + "\n")
    section = render(result)
    write_section(RESULTS, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
