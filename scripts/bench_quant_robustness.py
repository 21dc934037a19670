"""Which quantization-robustness metric predicts the PTQ loss increase, across optimizers.

    python scripts/bench_quant_robustness.py                      # adamw, sgd (+ lion with conf/optimizer/lion.yaml)
    python scripts/bench_quant_robustness.py --seeds 0 1 2        # more points: the correlations mean more
    python scripts/bench_quant_robustness.py --steps 20 --lr sgd=0.1 -- trainer.micro_batch_size=8
    python scripts/bench_quant_robustness.py --report             # re-render the tables from the JSON

Every run pretrains the default tiny model (model=tiny, its weights seeded by the run's seed)
on the Shakespeare corpus (data=shakespeare, algo=sft) for the same number of steps; only the
optimizer and its learning rate differ (about 15 minutes in all on 2 CPU cores by default). Each trained model is then measured on one fixed batch
of validation text (rlx/robustness.py): the W4A4 round-to-nearest relative error at the last
block (R_L), the max-to-mean and max-to-median ratios and the kurtosis of the linear layers'
inputs, the kurtosis of their weights, and the measured PTQ loss increase at W4A4 and W3A3.
For each metric: the order it puts the runs in, the share of run pairs it orders as the measured
increase does, and Spearman's rho with the increase when there are at least 3 runs.

Writes docs/results/bench_quant_robustness.json (runs of earlier invocations with other seeds or
optimizers are kept when the budget is the same) and its section of docs/RESULTS.md.
"""
from __future__ import annotations

import math

from rlx.benchmark import Bench, machine_line, trained
from rlx.errors import RlxError
from rlx.evaluate import concordant, spearman
from rlx.paths import CONF_DIR

MAX_LENGTH = 256  # algo=sft's: the calibration batch is as long as the training sequences
# Tuned so each optimizer trains the tiny model reasonably in a couple of hundred steps.
LR = {"adamw": 3e-3, "sgd": 0.3, "lion": 3e-4}
# 16 x 256 tokens per step: 200 steps take about 5 minutes on 2 CPU cores.
COMMON = ["model=tiny", "data=shakespeare", "algo=sft", f"algo.max_length={MAX_LENGTH}",
          f"trainer.eval_max_length={MAX_LENGTH}", "trainer.micro_batch_size=16", "trainer.eval_every=0",
          "trainer.save_every=0", "trainer.log_every=50", "trainer.eval_samples=64", "trainer.progress=false"]
# metric key -> label; the predictors, then what they predict
PREDICTORS = {"R_L": "R_L (W4A4)", "mmr_mean": "max/mean (MMR)", "max_to_median_mean": "max/median",
              "kurtosis_mean": "input kurtosis", "weight_kurtosis_mean": "weight kurtosis"}
TARGETS = {"ptq_loss_increase": "Δloss W4A4", "ptq_loss_increase_3bit": "Δloss W3A3"}


def optimizers() -> list[str]:
    """adamw and sgd, and lion where the config group has it."""
    return ["adamw", "sgd", *(["lion"] if (CONF_DIR / "optimizer" / "lion.yaml").exists() else [])]


def parse_lrs(items: list[str], names: list[str]) -> dict[str, float]:
    lrs = {name: LR[name] for name in names}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names:
            raise RlxError(f"--lr {item}: unknown optimizer {name!r}; valid: {', '.join(names)}")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise RlxError(f"--lr {item}: expected NAME=VALUE with a number, e.g. sgd=0.3") from None
    return lrs


def run(optimizer: str, lr: float, seed: int, steps: int, overrides: list[str], batch: dict) -> dict:
    """Pretrain one model, then measure it on `batch`."""
    from rlx.robustness import lm_loss, robustness_report

    with trained([*COMMON, f"optimizer={optimizer}", f"optimizer.lr={lr}", f"seed={seed}", f"model.seed={seed}",
                  f"trainer.max_steps={steps}", *overrides]) as t:
        model = t.policy().model.eval()
        summary = t.summary
    report = robustness_report(model, batch, bits=4)
    report["ptq_loss_increase_3bit"] = lm_loss(model, batch, bits=3) - report["loss_fp"]
    return {"optimizer": optimizer, "lr": lr, "seed": seed, "train_loss": summary["train/loss"],
            "eval_loss": summary["eval/loss"], "train_time_s": summary["train/time_s"],
            "wall_s": summary["wall_time_s"], **report}


def measure(args) -> dict:
    from rlx.config import build, compose_config
    from rlx.robustness import calibration_batch

    if min(args.steps, args.samples) < 1:
        bench.parser.error("--steps and --samples must be >= 1")
    try:
        lrs = parse_lrs(args.lr, args.runs)
    except RlxError as e:
        bench.parser.error(str(e))
    cfg = compose_config("train", [*COMMON, *args.overrides])
    batch = calibration_batch(build(cfg.data).split("validation"), build(cfg.model).tokenizer, args.samples,
                              MAX_LENGTH)
    budget = {"steps": args.steps, "samples": args.samples, "overrides": args.overrides}
    runs = bench.earlier(**budget).get("runs", [])
    runs = [r for r in runs if lrs.get(r["optimizer"], r["lr"]) == r["lr"]]  # one learning rate per optimizer
    return bench.sweep(lambda opt, seed: run(opt, lrs[opt], seed, args.steps, args.overrides, batch),
                       [(opt, seed) for seed in args.seeds for opt in args.runs], ("optimizer", "seed"), runs,
                       lambda runs: {**budget, "lr": {x["optimizer"]: x["lr"] for x in runs}, "predictors": predictors(runs)},
                       show=("eval_loss", "ptq_loss_increase", "R_L", "train_time_s"))


def label(r: dict, runs: list[dict]) -> str:
    return r["optimizer"] + (f"/s{r['seed']}" if len({x["seed"] for x in runs}) > 1 else "")


def predictors(runs: list[dict]) -> list[dict]:
    """Per metric: its order of the runs and its agreement with each measured increase."""
    out = []
    for key in [*TARGETS, *PREDICTORS]:
        x = [r[key] for r in runs]
        row = {"metric": key, "order": [label(r, runs) for _, r in sorted(zip(x, runs), key=lambda p: p[0])]}
        for target in TARGETS:
            y = [r[target] for r in runs]
            row[target] = {"concordant": concordant(x, y), "spearman": spearman(x, y)}
        out.append(row)
    return out


def render(result: dict) -> str:
    runs, m = result["runs"], result["machine"]
    lrs = ", ".join(f"{k} {v:g}" for k, v in result["lr"].items())
    lines = [bench.heading, "",
             f"The tiny model (model=tiny) pretrained on Shakespeare (data=shakespeare, algo=sft) for {result['steps']} "
             f"steps per run, learning rates {lrs}; measured on {result['samples']} fixed validation chunks "
             f"({MAX_LENGTH} tokens). Δloss is the next-token loss of the W{{b}}A{{b}} round-to-nearest model (decoder "
             "linear layers; weights per row, inputs per token, symmetric abs-max) minus that of the full-precision "
             "one. Statistics are means over the decoder's linear layers.", "",
             "| run | eval loss | Δloss W4A4 | Δloss W3A3 | R_L | max/mean | max/median | input kurtosis | "
             "weight kurtosis |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {label(r, runs)} | {r['eval_loss']:.3f} | {r['ptq_loss_increase']:+.4f} | "
                     f"{r['ptq_loss_increase_3bit']:+.4f} | {r['R_L']:.4f} | {r['mmr_mean']:.1f} | "
                     f"{r['max_to_median_mean']:.1f} | {r['kurtosis_mean']:.1f} | {r['weight_kurtosis_mean']:.2f} |")
    lines += ["", "Which metric predicts the increase: runs ordered from low to high by each, the share of run pairs "
              "ordered as the measured increase orders them, and Spearman's rho (3 runs or more).", "",
              "| metric | order (low → high) | pairs as Δloss W4A4 | ρ W4A4 | pairs as Δloss W3A3 | ρ W3A3 |",
              "|---|---|---:|---:|---:|---:|"]
    names = {**TARGETS, **PREDICTORS}
    for p in result["predictors"]:
        cells = []
        for target in TARGETS:
            (k, n), rho = p[target]["concordant"], p[target]["spearman"]
            cells += [f"{k}/{n}", "-" if math.isnan(rho) else f"{rho:+.2f}"]
        lines.append(f"| {names[p['metric']]} | {' < '.join(p['order'])} | {' | '.join(cells)} |")
    n = len(runs)
    lines += ["", f"{n} runs are weak evidence: by chance alone, a metric puts the {n} runs in exactly the measured "
              f"order, or its reverse, with probability 2/{n}! = {2 / math.factorial(n):.0%}. "
              "More seeds (`--seeds 0 1 2`) give more points.", "",
              f"- Machine: {machine_line(m)}.",
              f"- Command: `{result['command']}` ({result['date']}).", ""]
    return "\n".join(lines)


bench = Bench(__doc__, "## Quantization robustness across optimizers (bench_quant_robustness)",
              runs={name: [f"optimizer={name}"] for name in optimizers()},
              quick={"runs": ["adamw", "sgd"], "steps": 5, "samples": 2}, runs_alias="--optimizers")
bench.option("--seeds", nargs="+", type=int, default=[0])
bench.option("--steps", type=int, default=200, help="optimizer steps per run (same for every optimizer)")
bench.option("--lr", nargs="+", default=[], metavar="NAME=LR",
             help=f"learning rates (defaults: {', '.join(f'{k}={v:g}' for k, v in LR.items())})")
bench.option("--samples", type=int, default=16, help="validation chunks in the measured batch")
bench.option("overrides", nargs="*", help="more config overrides for every run (after --)")

if __name__ == "__main__":
    bench.main(measure, render)
