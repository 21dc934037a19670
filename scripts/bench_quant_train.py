"""Quantized pretraining of the default model on the built-in LM corpus: ECO against its baselines,
and QAT phases at 4 and 2 bits.

    make bench-quant                                  # = python scripts/bench_quant_train.py
    python scripts/bench_quant_train.py --runs none eco_fp8 master_fp8 --steps 200
    python scripts/bench_quant_train.py --report      # re-render the tables and plot from the JSON

Every run pretrains `model=tiny` (1.8M parameters, random init, seed 0) with `algo=sft` on
`data=shakespeare` for the same steps and tokens (AdamW, the default LR and cosine schedule), and
evaluates the validation loss (on the first 256 tokens of each held-out chunk, the length it trains
on) of the model as it is held at the end: the codes for ECO and
no-master, q(W) for the master-weight baseline. Memory is what the loop measures after the first
step: bytes held for weights (codes and scales where quantized) and optimizer state, plus the fp32
scratch a step materializes.

The QAT table pretrains with the LR phases of `quantizer=qat` (constant LR with warm-up, and the
decay either fused into QAT or as an FP cooldown followed by a QAT decay) and evaluates the
exported quantized checkpoint (`<run>/quantized`, weights on the grid), so a run whose QAT phase
is empty is plain round-to-nearest of the FP model.

Writes docs/results/bench_quant_train.json (kept across invocations with the same budget), the
"Quantized training" section of docs/RESULTS.md and docs/quant_train_loss.png.
"""
from __future__ import annotations

from pathlib import Path

from rlx.benchmark import Bench, keep, metric, pyplot, trained

EVAL = 128  # validation chunks of 1,024 characters
LENGTH = 256  # tokens per sequence, in training and in evaluation (positions beyond it are never trained)

COMMON = ["model=tiny", "data=shakespeare", "algo=sft", f"algo.max_length={LENGTH}", f"trainer.eval_max_length={LENGTH}",
          "trainer.micro_batch_size=8",
          "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=10", "trainer.progress=false",
          f"trainer.eval_samples={EVAL}", "trainer.eval_batch_size=16"]
FP8, INT4 = [], ["quantizer.format=int", "quantizer.bits=4", "quantizer.group_size=32"]
SR = ["quantizer.rounding=stochastic"]
ECO_RUNS = {
    "none": ["quantizer=none"],
    "master_fp8": ["quantizer=master", *FP8],
    "eco_fp8": ["quantizer=eco", *FP8],
    "eco_fp8_sr": ["quantizer=eco", *FP8, *SR],
    "no_master_fp8": ["quantizer=no_master", *FP8],
    "no_master_fp8_sr": ["quantizer=no_master", *FP8, *SR],
    "master_int4": ["quantizer=master", *INT4],
    "eco_int4": ["quantizer=eco", *INT4],
    "eco_int4_sr": ["quantizer=eco", *INT4, *SR],
    "no_master_int4": ["quantizer=no_master", *INT4],
    "no_master_int4_sr": ["quantizer=no_master", *INT4, *SR],
}
# The same at a tenth of the LR: AdamW's steps (about the LR per weight) fall below half the INT4
# grid spacing, the regime of fine-tuning where the ECO paper trains INT4 weights.
LOW_LR = {f"{name}_lowlr": [*ECO_RUNS[name], "optimizer.lr=3e-4"]
          for name in ("none", "master_int4", "eco_int4", "eco_int4_sr", "no_master_int4", "no_master_int4_sr")}
QAT_LR = ["trainer.lr_scheduler=constant_with_warmup"]
QAT_RUNS = {
    f"qat{bits}_{name}_{mode}": ["quantizer=qat", f"quantizer.bits={bits}", f"quantizer.start={start}", *QAT_LR,
                                 *(["quantizer.fuse_cooldown=true"] if mode == "fused" else ["quantizer.cooldown=0.2"])]
    for bits in (4, 2) for name, start in (("opt", "compute_optimal"), ("10pct", 0.9), ("50pct", 0.5))
    for mode in ("standard", "fused")
}
RUNS = {**ECO_RUNS, **LOW_LR, **QAT_RUNS}


KEEP = ("memory/weights_MB", "memory/optimizer_MB", "memory/held_MB", "memory/scratch_MB", "train/tokens",
        "qat/tokens_per_param_byte", "qat/fraction", "qat/planned_switch_step", "qat/switch_step")
bench = Bench(__doc__, "## Quantized training (bench_quant_train)", runs=RUNS,
              quick={"runs": ["none", "eco_fp8", "qat4_opt_fused"], "steps": 20})
bench.option("--steps", type=int, default=500)


def run(name: str, steps: int, task) -> dict:
    with trained([*COMMON, *RUNS[name], f"trainer.max_steps={steps}"]) as t:
        loss = t.summary["eval/loss"]
        if name.startswith("qat"):  # the exported quantized model, whatever the phase reached
            from rlx.evaluate import evaluate
            from rlx.models import hf

            policy = hf(str(Path(t.dir) / "quantized"), device="cpu")
            loss = evaluate(policy.model, policy.tokenizer, task, "validation", EVAL, 16, 0, LENGTH)["eval/loss"]
        return {"name": name, "overrides": RUNS[name], "steps": steps, "val_loss": loss,
                "train_time_s": t.summary["train/time_s"], "wall_s": t.summary["wall_time_s"], **keep(t.summary, KEEP),
                "curve": metric(t.rows, "train/loss", steps=True)}


def measure(args) -> dict:
    from rlx.config import build, compose_config

    task = build(compose_config("train", COMMON).data)
    return bench.sweep(lambda name: run(name, args.steps, task), args.runs, ("name",),
                       bench.earlier(steps=args.steps).get("runs", []), {"steps": args.steps},
                       show=("val_loss", "memory/held_MB", "wall_s"))


ECO_HEAD = ["| run | val loss | Δ vs master | weights MB | optimizer MB | held MB | held vs none | scratch MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]


def _eco_rows(runs: dict, names: dict, suffix: str) -> list[str]:
    none = runs.get(f"none{suffix}")
    rows = []
    for name in names:
        if name not in runs:
            continue
        r = runs[name]
        fmt = "int4" if "int4" in name else "fp8"
        master = runs.get(f"master_{fmt}{suffix}")
        delta = f"{r['val_loss'] - master['val_loss']:+.3f}" if master and not name.startswith("none") else ""
        ratio = f"{r['memory/held_MB'] / none['memory/held_MB']:.2f}×" if none else ""
        rows.append(f"| `{name}` | {r['val_loss']:.3f} | {delta} | {r['memory/weights_MB']:.2f} | "
                    f"{r['memory/optimizer_MB']:.2f} | {r['memory/held_MB']:.2f} | {ratio} | "
                    f"{r.get('memory/scratch_MB', 0):.2f} |")
    return rows


def render(result: dict) -> str:
    runs = {r["name"]: r for r in result["runs"]}
    lines = [bench.heading, "",
             f"`make bench-quant` (runs kept across invocations with the same steps; the last: `{result['command']}`) "
             f"on {result['machine']['cpu']} ({result['machine']['cpu_count']} cores), "
             f"{result['date']}. `model=tiny` pretrained on `data=shakespeare` for {result['steps']} steps "
             f"({runs[next(iter(runs))].get('train/tokens', 0):,} tokens), AdamW, validation loss on {EVAL} "
             "held-out chunks of the model as held at the end. Memory: MB held after step 1 (weights incl. "
             "codes and scales; optimizer state) and the fp32 scratch a step materializes.", "",
             *ECO_HEAD, *_eco_rows(runs, ECO_RUNS, "")]
    if any(n in runs for n in LOW_LR):
        lines += ["", "The same at `optimizer.lr=3e-4`, a tenth of the LR: most AdamW steps are then below half the INT4 "
                  "grid spacing.", "", *ECO_HEAD, *_eco_rows(runs, LOW_LR, "_lowlr")]
    qat = [runs[n] for n in QAT_RUNS if n in runs]
    if qat:
        lines += ["", "QAT phases (`trainer.lr_scheduler=constant_with_warmup`; standard = FP cooldown over the last 20% "
                  "of the FP phase, then a QAT decay; fused = the decay runs during QAT). Validation loss of the "
                  "exported quantized checkpoint; S = tokens per parameter byte, f = QAT fraction.", "",
                  "| bits | QAT start | S | f | first QAT step | standard | fused |", "|---:|---|---:|---:|---:|---:|---:|"]
        for bits in (4, 2):
            for label, key in (("compute-optimal", "opt"), ("last 10%", "10pct"), ("last 50%", "50pct")):
                std, fused = runs.get(f"qat{bits}_{key}_standard"), runs.get(f"qat{bits}_{key}_fused")
                ref = std or fused
                if not ref:
                    continue
                s = f"{ref['qat/tokens_per_param_byte']:.2f}" if "qat/tokens_per_param_byte" in ref else ""
                f = f"{ref['qat/fraction']:.3f}" if "qat/fraction" in ref else ""
                first = ref.get("qat/switch_step", "none (PTQ at export)")
                cells = [f"{x['val_loss']:.3f}" if x else "" for x in (std, fused)]
                lines.append(f"| {bits} | {label} | {s} | {f} | {first} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot(result: dict) -> None:
    runs = {r["name"]: r for r in result["runs"]}
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, fmt in zip(axes, ("fp8", "int4")):
        for name in ("none", f"master_{fmt}", f"eco_{fmt}", f"eco_{fmt}_sr", f"no_master_{fmt}", f"no_master_{fmt}_sr"):
            if name in runs:
                steps, losses = zip(*runs[name]["curve"])
                ax.plot(steps, losses, label=name, linestyle="--" if name.startswith("no_master") else "-")
        ax.set(title=f"{fmt} weights", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss")
    bench.save_figure(fig, "quant_train_loss.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
