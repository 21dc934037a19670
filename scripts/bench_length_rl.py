"""The accuracy-length frontier of the efficient-reasoning RL methods on the embedded task.

    make bench-length                                     # = python scripts/bench_length_rl.py; builds the SFT base on first use
    python scripts/bench_length_rl.py --runs grpo dler --seeds 0 1 2
    python scripts/bench_length_rl.py --runs ppo tppo     # the wall-clock comparison only
    python scripts/bench_length_rl.py --report            # re-render the tables and plots from the JSON

Every run starts from the tiny SFT base (built on first use) with the same prompts per rollout, group
size, learning rate, number of rollouts and seeds; only the method differs (METHODS below). After
training, the final checkpoint answers the 256 validation problems 4 times each at the training
temperature (T = 1, budget 128 tokens, fixed sampling seed), as the papers report pass@1 averaged
over samples: sampled accuracy, mean and p90 response length, tokens per correct answer, and the
share of responses that re-check their steps (the redundant reasoning the SFT traces carry;
a trace without it is ~29 tokens, so that is about the floor of what a method can cut without
skipping arithmetic). Greedy validation accuracy is reported beside it.

PPO against T-PPO compares wall-clock throughput on about the same number of finished responses
(responses and trained tokens per second, the share of time spent generating) and the final
accuracy each reaches; docs/tppo_wallclock.png plots training accuracy against seconds.

Writes docs/results/bench_length_rl.json (runs of earlier invocations with other methods or seeds
are kept), the "Accuracy-length frontier" section of docs/RESULTS.md, and the plots
docs/length_frontier.png and docs/tppo_wallclock.png.
"""
from __future__ import annotations

import math

import torch

from rlx.benchmark import Bench, machine_line, metric, pyplot, trained
from rlx.evaluate import mean_se

EVAL_SAMPLES, EVAL_BUDGET = 4, 128

# What every GRPO-family run shares: prompts per rollout, group size 8, minibatches per rollout.
PROMPTS, MINIBATCHES = 16, 2
COMMON = ["model=tiny_sft", f"trainer.micro_batch_size={PROMPTS}", "optimizer.lr=3e-5", "trainer.warmup_steps=0",
          "trainer.lr_scheduler=constant", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
          "trainer.progress=false"]
FAMILY = ["algo.group_size=8", f"algo.minibatches={MINIBATCHES}"]
METHODS = {
    "grpo": ["algo=grpo", "algo.max_new_tokens=128", *FAMILY],
    "naive_lp": ["algo=grpo", "algo.max_new_tokens=128", "reward=length_penalty", "reward.weights.length=0.5",
                 *FAMILY],
    "naive_lp_strong": ["algo=grpo", "algo.max_new_tokens=128", "reward=length_penalty", "reward.weights.length=2.0",
                        *FAMILY],
    "dler": ["algo=dler", *FAMILY],
    "dler_da": ["algo=dler", "algo.difficulty_aware=true", *FAMILY],
    "drpo": ["algo=drpo", "algo.max_new_tokens=128", *FAMILY],
    "grpo_lambda": ["algo=grpo_lambda", "algo.max_new_tokens=128", *FAMILY],
    "dot": ["algo=dot", "algo.max_new_tokens=128", *FAMILY],
    "ppo": ["algo=ppo", "algo.max_new_tokens=128", "algo.samples_per_prompt=8", "algo.epochs=1",
            f"algo.minibatches={MINIBATCHES}", "algo.lam=1.0", "algo.critic_lr=1e-3"],
    "tppo": ["algo=tppo", "algo.max_new_tokens=128", "algo.samples_per_prompt=8", "algo.lam=1.0",
             "algo.critic_lr=1e-3"],
}
RL_PAIR = ("ppo", "tppo")


bench = Bench(__doc__, "## Accuracy-length frontier (bench_length_rl)", runs=METHODS,
              quick={"runs": ["grpo", "tppo"], "seeds": [0], "rollouts": 2}, runs_alias="--methods")
bench.option("--seeds", nargs="+", type=int, default=[0, 1, 2])
bench.option("--rollouts", type=int, default=60, help="rollouts per run (same for every method)")
bench.option("overrides", nargs="*", help="more config overrides for every run (after --)")


@torch.no_grad()
def sampled_eval(model, tokenizer, task, seed: int = 1234) -> dict:
    """pass@1 over EVAL_SAMPLES samples per validation problem at T = 1, the response lengths, and
    greedy accuracy."""
    from rlx.evaluate import answers, sampled_answers, sampled_metrics

    out = sampled_answers(model, tokenizer, task, task.split("validation"), EVAL_SAMPLES, EVAL_BUDGET, seed=seed)
    texts = [t for group in out["texts"] for t in group]
    greedy, _ = answers(model, tokenizer, task, task.split("validation"), 64, EVAL_BUDGET)
    return {**sampled_metrics(out), "recheck_rate": sum("check:" in t for t in texts) / len(texts),
            "greedy_accuracy": sum(greedy) / len(greedy)}


def training_means(rows: list[dict]) -> dict[str, float]:
    """Every training metric averaged over the run (e.g. how often DOT cut, DLER's all-zero groups)."""
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and "/" in k}
    return {k: sum(metric(rows, k)) / len(metric(rows, k)) for k in sorted(keys)}


def curve(rows: list[dict]) -> list[dict]:
    """Per logged step: cumulative wall-clock seconds (batch + update), training accuracy, tokens."""
    out, clock = [], 0.0
    for r in rows:
        if "time/batch_s" not in r:
            continue
        clock += r["time/batch_s"] + r.get("time/update_s", 0.0)
        out.append({"step": r["step"], "time_s": clock, "accuracy": r.get("rl/accuracy"),
                    "response_len": r.get("rl/response_len"), "tokens": r.get("train/tokens")})
    return out


def run(method: str, seed: int, rollouts: int, overrides: list[str], task) -> dict:
    from rlx.merge import merge_checkpoints
    from rlx.models import hf
    from rlx.paths import cache_dir

    # T-PPO's step is one window, in which ~2/3 of the pool finishes: 1.5 windows ~ one PPO rollout
    steps = int(rollouts * 1.5) if method == "tppo" else rollouts * MINIBATCHES
    with trained([*COMMON, *METHODS[method], f"seed={seed}", f"trainer.max_steps={steps}", *overrides]) as t:
        trained_policy = t.policy()
        result = sampled_eval(trained_policy.model, trained_policy.tokenizer, task)
        if method.startswith("dler"):  # DLER's update-selective merge into the base, as the paper's
            merged = merge_checkpoints(cache_dir() / "models" / "tiny-sft", t.dir, t.dir / "merged")
            policy = hf(str(merged), dtype="float32", device="cpu")
            result["merged"] = sampled_eval(policy.model, policy.tokenizer, task)
        return {"method": method, "seed": seed, "rollouts": rollouts, "overrides": overrides,
                "steps": t.summary["steps"], "train_time_s": t.summary["train/time_s"],
                "wall_s": t.summary["wall_time_s"], **result, "curve": curve(t.rows),
                "training_means": training_means(t.rows)}


def measure(args) -> dict:
    from rlx.config import build, compose_config

    cfg = compose_config("train", ["model=tiny_sft"])
    policy, task = build(cfg.model), build(cfg.data)
    budget = {"rollouts": args.rollouts, "overrides": args.overrides}  # runs of another budget are not comparable
    return bench.sweep(lambda method, seed: run(method, seed, args.rollouts, args.overrides, task),
                       [(method, seed) for seed in args.seeds for method in args.runs], ("method", "seed", "overrides"),
                       bench.earlier(**budget).get("runs", []),
                       {**budget, "base": sampled_eval(policy.model, policy.tokenizer, task)},
                       show=("accuracy", "mean_len", "train_time_s"))


def summarise(runs: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    merged = [{**r, **r["merged"], "method": r["method"] + "_merged"} for r in runs if "merged" in r]
    for r in runs + merged:
        by.setdefault(r["method"], []).append(r)
    keys = ("accuracy", "mean_len", "p90_len", "tokens_per_correct", "recheck_rate", "greedy_accuracy", "train_time_s")
    return {m: {"seeds": len(rs), **{k: mean_se([r[k] for r in rs]) for k in keys}} for m, rs in by.items()}


def throughput(r: dict, prompts: int = PROMPTS, minibatches: int = MINIBATCHES) -> dict:
    """A PPO or T-PPO run's wall-clock figures: responses finished and trained on, seconds, their
    rates, and the share of the time spent generating (`prompts` per rollout and `minibatches` per
    rollout are the calling benchmark's)."""
    steps, total = r["steps"], r["curve"][-1]["time_s"]
    means = r["training_means"]
    samples = next((int(o.split("=")[1]) for o in r.get("overrides", []) if o.startswith("algo.samples_per_prompt=")), 8)
    # PPO: every rollout finishes prompts x samples responses; T-PPO logs how many finished per window
    responses = means["rl/finished"] * steps if r["method"] == "tppo" else steps / minibatches * prompts * samples
    rollout_steps = steps if r["method"] == "tppo" else steps / minibatches
    return {"responses": responses, "seconds": total, "responses_per_s": responses / total,
            "tokens_per_s": r["curve"][-1]["tokens"] / total,
            "generation_share": means["rl/rollout_s"] * rollout_steps / total}


def wallclock(runs: list[dict]) -> dict[str, dict]:
    """PPO and T-PPO: throughput and final accuracy, mean ± s.e. over seeds."""
    out = {}
    for method in RL_PAIR:
        rs = [r for r in runs if r["method"] == method]
        if rs:
            figures = [{**throughput(r), "accuracy": r["accuracy"], "greedy_accuracy": r["greedy_accuracy"]} for r in rs]
            out[method] = {"seeds": len(rs), **{k: mean_se([f[k] for f in figures]) for k in figures[0]}}
    return out


def fmt(pair: tuple[float, float], spec: str, scale: float = 1.0) -> str:
    m, se = pair
    return f"{m * scale:{spec}}" + ("" if math.isnan(se) else f" ± {se * scale:{spec}}")


def render(result: dict) -> str:
    base, summary = result["base"], summarise(result["runs"])
    rows = [f"| SFT base | - | {base['accuracy']:.1%} | {base['mean_len']:.1f} | {base['p90_len']:.0f} | "
            f"{base['tokens_per_correct']:.1f} | {base['recheck_rate']:.1%} | {base['greedy_accuracy']:.1%} | - |"]
    for method in [m for name in METHODS for m in (name, name + "_merged") if m in summary]:
        s = summary[method]
        change = s["mean_len"][0] / base["mean_len"] - 1
        rows.append(f"| {method} | {s['seeds']} | {fmt(s['accuracy'], '.1f', 100)}% | {fmt(s['mean_len'], '.1f')} "
                    f"({change:+.0%}) | {fmt(s['p90_len'], '.0f')} | {fmt(s['tokens_per_correct'], '.1f')} | "
                    f"{fmt(s['recheck_rate'], '.1f', 100)}% | {fmt(s['greedy_accuracy'], '.1f', 100)}% | "
                    f"{s['train_time_s'][0] / 60:.1f} |")
    m = result["machine"]
    lines = [bench.heading, "",
             f"From the tiny SFT base, {result['rollouts']} rollouts of {PROMPTS} prompts x 8 samples per run, "
             f"{MINIBATCHES} optimizer steps per rollout, lr 3e-5; evaluated on the 256 validation problems x "
             f"{EVAL_SAMPLES} samples at T = 1 (budget {EVAL_BUDGET}). Mean ± standard error over seeds. "
             "Length change is relative to the base; 're-checks' is the share of responses that repeat their "
             "steps before answering (a trace without re-checks is ~29 tokens).", "",
             "| method | seeds | sampled acc. | mean len (change) | p90 len | tokens / correct | re-checks | "
             "greedy acc. | train min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]
    pair = wallclock(result["runs"])
    if pair:
        lines += ["PPO against T-PPO (same prompts, samples per prompt, lr, critic lr and lam = 1; T-PPO keeps its "
                  "clip-higher 0.28 and 32-token windows, and runs 1.5 windows per PPO rollout so both train on about "
                  "as many finished responses):", "",
                  "| method | seeds | responses | wall-clock s | responses / s | trained tokens / s | "
                  "generating | sampled acc. | greedy acc. |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, w in pair.items():
            lines.append(f"| {method} | {w['seeds']} | {w['responses'][0]:.0f} | {fmt(w['seconds'], '.0f')} | "
                         f"{fmt(w['responses_per_s'], '.1f')} | {fmt(w['tokens_per_s'], '.0f')} | "
                         f"{w['generation_share'][0]:.0%} | {fmt(w['accuracy'], '.1f', 100)}% | "
                         f"{fmt(w['greedy_accuracy'], '.1f', 100)}% |")
        lines.append("")
    lines += ["![accuracy against length](length_frontier.png)", "",
              "What each method achieved against GRPO and the naive penalty, and why: "
              "[length_rl.md](length_rl.md#what-the-benchmark-shows). PPO and T-PPO training accuracy against "
              "wall-clock: [tppo_wallclock.png](tppo_wallclock.png).", "",
              f"- Machine: {machine_line(m)}.",
              f"- Command: `{result['command']}` (last run {result['date']}).", ""]
    return "\n".join(lines)


def plot(result: dict) -> None:
    summary, base = summarise(result["runs"]), result["base"]
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    ax.scatter([base["mean_len"]], [100 * base["accuracy"]], marker="*", s=150, color="black", label="SFT base")
    for method, s in summary.items():
        if method in RL_PAIR:
            continue
        (x, xe), (y, ye) = s["mean_len"], s["accuracy"]
        ax.errorbar([x], [100 * y], xerr=[0 if math.isnan(xe) else xe], yerr=[0 if math.isnan(ye) else 100 * ye],
                    fmt="o", capsize=3, label=method)
    ax.set(xlabel="mean response length (tokens, sampled at T = 1)", ylabel="sampled accuracy (%)",
           title="Accuracy-length frontier on the embedded task")
    bench.save_figure(fig, "length_frontier.png", ax)
    if fig := wallclock_figure(result["runs"]):
        bench.save_figure(fig, "tppo_wallclock.png")


def wallclock_figure(runs: list[dict], title: str | None = None):
    """PPO's and T-PPO's training accuracy (moving average of 5 steps) against wall-clock seconds,
    one line per seed (bench_length_hard draws its own with this); None without both methods."""
    curves = {m: [r for r in runs if r["method"] == m] for m in RL_PAIR}
    if not all(curves.values()):
        return None
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    for method, rs in curves.items():
        for r in rs:
            pts = [p for p in r["curve"] if p["accuracy"] is not None]
            acc = [sum(p["accuracy"] for p in pts[max(0, i - 4):i + 1]) / len(pts[max(0, i - 4):i + 1])
                   for i in range(len(pts))]
            ax.plot([p["time_s"] for p in pts], acc, color="C0" if method == "ppo" else "C1",
                    alpha=0.8, label=f"{method} seed {r['seed']}")
    ax.set(xlabel="wall-clock seconds (rollout + update)", ylabel="training accuracy (moving average of 5 steps)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    bench.main(measure, render, plot)
