"""Accuracy lift of online RL over the SFT base: `rlx train experiment=<algo>_tiny` for GRPO and PPO.

    python scripts/bench_rl_lift.py                      # needs the SFT base (built on first use); ~15 min on 2 CPU cores
    python scripts/bench_rl_lift.py --runs grpo --steps 50 -- optimizer.lr=5e-5

Each run starts from the cached tiny SFT base. The base and each run's final checkpoint answer
the same 768 held-out problems (validation 256 + test 512) greedily, and the lift is reported
as a paired difference: the mean of (after - before) per problem with its standard error
sd / sqrt(n), which is much tighter than comparing two independent accuracies because most
problems are answered alike before and after. A lift more than two standard errors from zero
is marked as significant. Also reported: the sampled training accuracy (at the run's
temperature) of the first and last logging windows. Writes docs/results/bench_rl_lift.json
(runs of earlier invocations with other algorithms or overrides are kept) and the "RL accuracy
lift" section of docs/RESULTS.md (`--report` re-renders it from the JSON).
"""
from __future__ import annotations

from rlx.benchmark import Bench, command, machine_line, metric, trained
from rlx.evaluate import paired_difference

SPLITS = {"validation": 256, "test": 512}
RUNS = {algo: [f"experiment={algo}_tiny", "trainer.progress=false"] for algo in ("grpo", "ppo")}
bench = Bench(__doc__, "## RL accuracy lift over the SFT base (bench_rl_lift)", runs=RUNS,
              quick={"runs": ["grpo"], "steps": 2}, runs_alias="--algos")
bench.option("--steps", type=int, help="override trainer.max_steps")
bench.option("overrides", nargs="*", help="more config overrides for every run (after --)")


def correctness(model, tokenizer, task) -> dict[str, list[bool]]:
    from rlx.evaluate import answers

    return {s: answers(model, tokenizer, task, list(task.split(s))[:n], 64, 160)[0] for s, n in SPLITS.items()}


def run(algo: str, overrides: list[str], base: dict, task) -> dict:
    with trained([*RUNS[algo], *overrides]) as t:
        tuned = t.policy()
        after = correctness(tuned.model, tuned.tokenizer, task)
        sampled = metric(t.rows, "rl/accuracy")
    both_b = [x for s in SPLITS for x in base[s]]
    both_a = [x for s in SPLITS for x in after[s]]
    lift, se = paired_difference(both_b, both_a)
    return {
        "algo": algo, "overrides": overrides, "steps": t.summary["steps"], "train_time_s": t.summary["train/time_s"],
        "accuracy": {s: sum(after[s]) / len(after[s]) for s in SPLITS},
        "accuracy_all": sum(both_a) / len(both_a), "lift": lift, "lift_se": se, "significant": abs(lift) > 2 * se,
        "sampled_accuracy_first": sampled[0], "sampled_accuracy_last": sampled[-1], "command": command(),
    }


def measure(args) -> dict:
    from rlx.config import build, compose_config

    overrides = [*([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.overrides]
    cfg = compose_config("train", ["experiment=grpo_tiny"])
    policy, task = build(cfg.model), build(cfg.data)
    base = correctness(policy.model, policy.tokenizer, task)
    base_acc = {s: sum(v) / len(v) for s, v in base.items()}
    base_acc["all"] = sum(sum(v) for v in base.values()) / sum(len(v) for v in base.values())
    runs = [run(algo, overrides, base, task) for algo in args.runs]
    # Runs of other (algo, overrides) from earlier invocations stay in the table; reruns replace theirs.
    key = lambda r: (r["algo"], tuple(r["overrides"]))
    runs = [r for r in bench.load().get("runs", []) if key(r) not in {key(n) for n in runs}] + runs
    return bench.record(base=base_acc, runs=runs)


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
        bench.heading, "",
        f"Greedy accuracy on the same {n} held-out problems (validation 256 + test 512) before and after RL from the "
        "tiny SFT base; the lift is the paired per-problem difference +- its standard error (significant: beyond "
        "2 s.e.). The last column is the sampled accuracy of the training rollouts (at the run's temperature), first "
        "and last logging window.", "",
        "| run | training | validation | test | all | lift (paired) | sampled acc. in training |",
        "|---|---|---:|---:|---:|---:|---:|", *rows, "",
        f"- Machine: {machine_line(m)}.",
        f"- Commands: {commands} (last run {result['date']}).", ""])


if __name__ == "__main__":
    bench.main(measure, render)
