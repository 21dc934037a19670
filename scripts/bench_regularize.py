"""Regularizers against plain AdamW where regularization can matter: a small corpus seen for many epochs.

    python scripts/bench_regularize.py                      # every run, 3 seeds (about 8 minutes on 2 idle CPU cores)
    python scripts/bench_regularize.py --runs adamw compander --seeds 0
    python scripts/bench_regularize.py --report             # re-render the table and plot from the JSON

Every run pretrains `model=tiny` (1.8M parameters, random init with `model.seed` = the seed) with
`algo=sft` on `data=shakespeare` cut into 256-character chunks, of which only the first 0.5% of each
text is trained on (`data.validation_fraction=0.945`: a 25k-character training split of 99 chunks,
seen about 8 times in 100 steps of 8 chunks), at AdamW's rlx default (lr 3e-3, no weight decay,
cosine after 30 warmup steps).
The runs differ only in the regularizer:
* `adamw`: nothing;
* `compander`: `model.parameterization=compander` (rlx/compander.py: μ-law companding of each
  attention/MLP weight, μ 3, per-layer RMS scale; NOT the paper's exact function, see there);
* `compander_learned`: the same with μ learned per layer (the paper's extension);
* `grad_norm`: `regularizer=grad_norm` (its own defaults), skipped with a message while
  conf/regularizer/grad_norm.yaml does not exist.
Reported, mean ± standard error over seeds: validation loss on 256 held-out chunks (the middle of
each text) and the final training loss (the mean of the last 5 logged steps), their gap, and the
weight statistics the compander paper discusses, over the attention/MLP layers' effective weights:
the share of entries with |w| < 0.1 · RMS of their layer (a Gaussian: 8.0%) and the largest |w|.
Writes docs/results/bench_regularize.json, the "Regularizers on a small corpus" section of
docs/RESULTS.md and docs/regularize.png (the training loss curves, and the validation loss per seed).
"""
from __future__ import annotations

import math

from rlx.benchmark import Bench, keep, machine_line, metric, pyplot, trained
from rlx.evaluate import mean_se
from rlx.paths import CONF_DIR

LENGTH = 256
COMMON = ["model=tiny", "data=shakespeare", f"data.chunk_chars={LENGTH}", "data.validation_fraction=0.945",
          "data.test_fraction=0.05", "algo=sft", f"algo.max_length={LENGTH}", f"trainer.eval_max_length={LENGTH}",
          "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=10",
          "trainer.progress=false", "trainer.eval_samples=256", "trainer.eval_batch_size=32",
          "+hooks.weights._target_=rlx.compander.CompanderExport", "+hooks.weights.export=false"]
RUNS = {
    "adamw": [],
    "compander": ["model.parameterization=compander"],
    "compander_learned": ["model.parameterization={name:compander,learnable:true}"],
    "grad_norm": ["regularizer=grad_norm"],
}
NEEDS = {"grad_norm": CONF_DIR / "regularizer" / "grad_norm.yaml"}
KEEP = ("eval/loss", "train/loss", "train/tokens", "weights/near_zero_share", "weights/max_abs",
        "weights/max_over_rms", "compander/mu_mean")

bench = Bench(__doc__, "## Regularizers on a small corpus (bench_regularize)", runs=RUNS,
              quick={"runs": ["adamw", "compander", "grad_norm"], "seeds": [0], "steps": 10})
bench.option("--seeds", nargs="+", type=int, default=[0, 1, 2])
bench.option("--steps", type=int, default=100, help="training steps of every run")


def run(name: str, seed: int, steps: int) -> dict:
    with trained([*COMMON, *RUNS[name], f"seed={seed}", f"model.seed={seed}", f"trainer.max_steps={steps}"]) as t:
        s = t.summary
        curve = metric(t.rows, "train/loss", steps=True)
        tail = [v for _, v in curve[-5:]]
        return {"name": name, "seed": seed, "overrides": RUNS[name], "steps": steps, "wall_s": s["wall_time_s"],
                "step_s": s["train/time_s"] / steps, **keep(s, KEEP), "train/loss_tail": sum(tail) / len(tail),
                "curve": curve}


def measure(args) -> dict:
    missing = [n for n in args.runs if n in NEEDS and not NEEDS[n].exists()]
    for name in missing:
        print(f"skipping {name}: {NEEDS[name].relative_to(CONF_DIR.parent)} does not exist yet", flush=True)
    items = [(n, s, args.steps) for n in args.runs if n not in missing for s in args.seeds]
    return bench.sweep(run, items, ("name", "seed"), bench.earlier(steps=args.steps).get("runs", []),
                       {"steps": args.steps}, order=list(RUNS), show=("eval/loss", "train/loss_tail", "step_s"))


# ---------------------------------------------------------------------------- report


def _by_name(result: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in result["runs"]:
        out.setdefault(r["name"], []).append(r)
    return out


def _cell(values: list[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    values = [v * scale for v in values if v == v]
    if not values:
        return "-"
    m, se = mean_se(values)
    return f"{m:{fmt}}" if math.isnan(se) else f"{m:{fmt}} ± {se:{fmt}}"


def render(result: dict) -> str:
    groups = _by_name(result)
    m = result["machine"]
    wall = sum(r["wall_s"] for r in result["runs"])
    lines = [bench.heading, "",
             f"`python scripts/bench_regularize.py` (the last: `{result['command']}`), {result['date']}, "
             f"{machine_line(m)}; {wall / 60:.1f} minutes of runs.", "",
             f"`model=tiny` pretrained from scratch on 0.5% of `data=shakespeare` (99 chunks of 256 characters, "
             f"{result['steps']} steps of 8: {result['steps'] * 8 / 99:.0f} epochs), AdamW lr 3e-3 without weight decay; validation loss "
             "on 256 held-out chunks, training loss over the last 5 logged steps, the weight statistics over "
             "the attention/MLP layers' effective weights (near zero: |w| < 0.1 · the layer's RMS; a Gaussian "
             "has 8.0%). Mean ± standard error over seeds.", "",
             "| run | seeds | val loss | train loss | gap | near-zero % | max abs w | max/RMS | learned μ | step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in RUNS:
        rs = groups.get(name)
        if not rs:
            lines.append(f"| `{name}` | 0 | not run | | | | | | | |")
            continue
        gap = [r["eval/loss"] - r["train/loss_tail"] for r in rs]
        mu = [metric(r, "compander/mu_mean") for r in rs]
        lines.append(
            f"| `{name}` | {len(rs)} | {_cell([r['eval/loss'] for r in rs])} | {_cell([r['train/loss_tail'] for r in rs])} "
            f"| {_cell(gap)} | {_cell([metric(r, 'weights/near_zero_share') for r in rs], '.1f', 100)} "
            f"| {_cell([metric(r, 'weights/max_abs') for r in rs], '.3f')} "
            f"| {_cell([metric(r, 'weights/max_over_rms') for r in rs], '.2f')} | {_cell(mu, '.2f')} "
            f"| {_cell([r['step_s'] for r in rs], '.3f')} |")
    lines += ["", "Overrides per run (beyond the common ones in the script): "
              + "; ".join(f"`{n}`: `{' '.join(RUNS[n]) or '-'}`" for n in RUNS if n in groups) + "."]
    return "\n".join(lines)


def plot(result: dict) -> None:
    groups = _by_name(result)
    if not groups:
        return
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for name, rs in groups.items():
        steps = [s for s, _ in rs[0]["curve"]]
        mean = [sum(r["curve"][i][1] for r in rs) / len(rs) for i in range(min(len(r["curve"]) for r in rs))]
        left.plot(steps[:len(mean)], mean, label=name)
        for r in rs:
            right.scatter([name], [r["eval/loss"]], s=20)
    left.set(xlabel="step", ylabel="training loss (mean over seeds)", title="training loss")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.set(ylabel="validation loss", title=f"validation loss after {result['steps']} steps (one dot per seed)")
    right.grid(alpha=0.3)
    bench.save_figure(fig, "regularize.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
