"""Dynamic loss-based sample reweighting (arXiv 2502.06733) against uniform weights, pretraining at equal tokens.

    python scripts/bench_reweight.py                     # uniform, linupper, quadratic x 3 seeds
    python scripts/bench_reweight.py --runs uniform linupper --seeds 0 --steps 100
    python scripts/bench_reweight.py --report            # re-render the table and plot from the JSON

Every run pretrains `model=tiny` (1.8M parameters, random init from the run's seed) with `algo=sft` on
`data=shakespeare` cut into 128-character chunks (128 tokens: every sample the same length, so the
uniform run's token mean is the sample mean the weighted runs reweight), micro-batch 16 (the batch
the weights are normalized over), AdamW at rlx's LR for the tiny model with a cosine schedule, the
same steps and tokens and, per seed, the same initial weights and data order. `uniform` is
`weighting=none`; `linupper` and `quadratic` are `weighting=loss_based` with delta 1 and r 1 and the
reference GPT-2 code's burn-in of 5% of the steps with uniform weights (its 1000 of 20,000).
Validation loss on held-out chunks every `--eval-every` steps; reported: the final validation loss
and perplexity (mean ± s.e. over seeds), the per-seed paired difference to uniform, and the step at
which each run's curve first reaches the uniform run's final loss (the paper's claim: faster
convergence).

Writes docs/results/bench_reweight.json (runs kept across invocations with the same budget), the
"Loss-based sample reweighting" section of docs/RESULTS.md and docs/reweight.png.
"""
from __future__ import annotations

import math

from rlx.benchmark import Bench, keep, metric, pyplot, trained
from rlx.evaluate import mean_se

LENGTH = 128
PRETRAIN = ["model=tiny", "data=shakespeare", f"data.chunk_chars={LENGTH}", "algo=sft", f"algo.max_length={LENGTH}",
            f"trainer.eval_max_length={LENGTH}", "trainer.micro_batch_size=16", "trainer.save_every=0",
            "trainer.log_every=10", "trainer.progress=false", "trainer.eval_batch_size=64",
            "trainer.lr_scheduler=cosine"]
RUNS = {
    "uniform": ["weighting=none"],
    "linupper": ["weighting=loss_based", "weighting.strategy=linupper"],
    "quadratic": ["weighting=loss_based", "weighting.strategy=quadratic"],
}
KEEP = ("eval/loss", "eval/perplexity", "train/tokens", "wall_time_s")

bench = Bench(__doc__, "## Loss-based sample reweighting (bench_reweight)", runs=RUNS,
              quick={"runs": ["uniform", "linupper"], "seeds": [0], "steps": 6, "eval_every": 3, "eval_samples": 16})
bench.option("--seeds", nargs="+", type=int, default=[0, 1, 2])
bench.option("--steps", type=int, default=120, help="optimizer steps per run (16 x 128 tokens each)")
bench.option("--eval-every", type=int, default=20, help="steps between validation passes")
bench.option("--eval-samples", type=int, default=128, help="held-out chunks per validation pass")
bench.option("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine two threads "
             "contending with other jobs ran ~6x slower per step)")


def overrides(name: str, seed: int, args) -> list[str]:
    warmup = [f"weighting.warmup={max(1, round(0.05 * args.steps))}"] if name != "uniform" else []
    return [*PRETRAIN, *RUNS[name], *warmup, f"seed={seed}", f"trainer.max_steps={args.steps}",
            f"trainer.eval_every={args.eval_every}", f"trainer.eval_samples={args.eval_samples}",
            f"trainer.warmup_steps={max(1, args.steps // 20)}"]


def run(name: str, seed: int, args) -> dict:
    over = overrides(name, seed, args)
    with trained(over, quiet=True) as t:
        train_key = "train/loss" if name == "uniform" else "train/sample_loss"  # the unweighted mean loss
        return {"run": name, "seed": seed, "overrides": over[len(PRETRAIN):], **keep(t.summary, KEEP),
                "eval_curve": metric(t.rows, "eval/loss", steps=True),
                "train_curve": metric(t.rows, train_key, steps=True),
                "entropy_curve": metric(t.rows, "weight/entropy", steps=True)}


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    budget = {"steps": args.steps, "eval_every": args.eval_every, "eval_samples": args.eval_samples}
    return bench.sweep(lambda name, seed: run(name, seed, args),
                       [(name, seed) for seed in args.seeds for name in args.runs], ("run", "seed"),
                       bench.earlier(**budget).get("runs", []), budget, order=list(RUNS),
                       show=("eval/loss", "eval/perplexity", "wall_time_s"))


# ---------------------------------------------------------------------------- report


def reach(curve: list, target: float) -> float:
    """The first step at which the validation curve is at or below `target`, linearly interpolated
    between evaluations (NaN if it never gets there)."""
    for (s0, v0), (s1, v1) in zip([(0, math.inf), *curve], curve):
        if v1 <= target:
            return s1 if not math.isfinite(v0) else s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return math.nan


def fmt(value: tuple[float, float], spec: str = ".3f") -> str:
    mean, se = value
    return f"{mean:{spec}}" + ("" if math.isnan(se) else f" ± {se:{spec}}")


def render(result: dict) -> str:
    runs = result["runs"]
    by = {name: {r["seed"]: r for r in runs if r["run"] == name} for name in RUNS}
    base = by["uniform"]
    m = result["machine"]
    lines = [bench.heading, "",
             f"`{result['command']}` on {m['cpu']} ({m['cpu_count']} cores, shared with other jobs), {result['date']}. "
             f"`model=tiny` pretrained on `data=shakespeare` (128-token chunks, micro-batch 16, AdamW 3e-3, cosine), "
             f"{result['steps']} steps ({runs[0].get('train/tokens', 0):,} tokens) per run; validation loss on "
             f"{result['eval_samples']} held-out chunks every {result['eval_every']} steps. Reweighted runs: "
             "`weighting=loss_based` (delta 1, r 1) after a 5% burn-in of uniform weights. Mean ± s.e. over seeds; "
             "Δ is paired by seed (same init and data order); 'steps to uniform's final loss': where the run's "
             "validation curve first reaches the uniform run's final validation loss (of the same seed).", "",
             "| run | seeds | final val loss | val ppl | Δ loss vs uniform | steps to uniform's final loss | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, seeds in by.items():
        if not seeds:
            continue
        rs = list(seeds.values())
        paired = [r["eval/loss"] - base[s]["eval/loss"] for s, r in seeds.items() if s in base]
        steps = [reach(r["eval_curve"], base[s]["eval/loss"]) for s, r in seeds.items() if s in base]
        delta = fmt(mean_se(paired), "+.4f") if paired and name != "uniform" else ""
        reached = [x for x in steps if x == x]
        to = (f"{fmt(mean_se(reached), '.0f')}" + (f" ({len(reached)}/{len(steps)} reach it)"
              if len(reached) < len(steps) else "")) if reached else ("never" if steps else "-")
        lines.append(f"| `{name}` | {len(rs)} | {fmt(mean_se([r['eval/loss'] for r in rs]), '.4f')} | "
                     f"{fmt(mean_se([metric(r, 'eval/perplexity') for r in rs]), '.3f')} | {delta} | "
                     f"{to} | {fmt(mean_se([r['wall_time_s'] for r in rs]), '.0f')} |")
    total = sum(r.get("wall_time_s", 0) for r in runs)
    lines += ["", f"Total training wall time {total / 60:.1f} min. Overrides per run (after the shared ones): "
              + "; ".join(f"`{n}`: `{' '.join(next(iter(s.values()))['overrides'])}`" for n, s in by.items() if s)
              + ". Curves: docs/reweight.png."]
    return "\n".join(lines)


def plot(result: dict) -> None:
    fig, (ax, bx) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(RUNS):
        rs = [r for r in result["runs"] if r["run"] == name]
        for j, r in enumerate(rs):
            steps, loss = zip(*r["eval_curve"]) if r["eval_curve"] else ((), ())
            ax.plot(steps, loss, color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
            if r["entropy_curve"]:
                s, e = zip(*r["entropy_curve"])
                bx.plot(s, e, color=f"C{i}", alpha=0.6, marker=".", label=name if j == 0 else None)
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="model=tiny on shakespeare, one line per seed")
    bx.set(xlabel="step", ylabel="weight entropy / log B", title="how far from uniform the weights are")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend()
    bench.save_figure(fig, "reweight.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
