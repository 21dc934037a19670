"""FTWT on the SFT base: greedy accuracy and validation loss against the share of MLP (and model)
multiply-adds skipped, per mass fraction tau, with a static cut at the same FLOPs beside each.

    python scripts/bench_ftwt.py                      # tau 0.9, 0.95, 0.99, seed 0
    python scripts/bench_ftwt.py --runs 0.9 --seeds 0 1
    python scripts/bench_ftwt.py --report             # re-render the table and plot from the JSON

Each dynamic row is `rlx train algo=ftwt algo.tau=<tau>` (decoupled: the SFT base frozen, only the
rank-32 heads trained, by BCE) for `--steps` steps of 16 problems at a constant head LR 3e-3, then
the gated model rebuilt from the run's checkpoint (`rlx.compress.ftwt.load_gated`) is evaluated on
`--problems` validation problems: greedy accuracy (answer checked, up to 160 new tokens) and the
teacher-forced validation loss. The FLOPs shares are counted over every token those evaluations
pushed through the MLPs (prompts, generated tokens, padding): per token 3*H*|kept| + the head's
r(H + I), against the dense 3*H*I of every block, and against all linear layers of the model
(attention, MLP, LM head; attention's score products left out). They are counted, not timed.

The static row beside each tau keeps, in every block, a fixed set of channels: the top-k by mean
|h| over 256 training problems of the dense base, with k per block matched to the dynamic run's
MLP multiply-adds in that block (its mean kept channels plus its head's cost in channels), so both
spend the same MLP FLOPs; it computes from the gathered weights (really skipping the rest).
The paper's claim in miniature: at equal FLOPs the per-input masks keep more accuracy than the cut.

Writes docs/results/bench_ftwt.json, the "FTWT dynamic pruning" section of docs/RESULTS.md and
docs/ftwt.png.
"""
from __future__ import annotations

import time

import torch

from rlx.benchmark import Bench, machine_line, pyplot, trained
from rlx.compress.ftwt import FTWTGate, head_macs, load_gated, mean_mass, static_masks
from rlx.data.collate import lm_batch
from rlx.data.reasoning import ReasoningTask
from rlx.evaluate import evaluate, mean_se, proportion_se
from rlx.models import tiny_sft

TAUS = {"0.9": 0.9, "0.95": 0.95, "0.99": 0.99}
TRAIN = ["trainer.micro_batch_size=16", "trainer.warmup_steps=0", "trainer.lr_scheduler=constant", "algo.head_lr=3e-3",
         "trainer.progress=false", "trainer.eval_every=0", "trainer.eval_samples=0", "trainer.log_every=5"]
bench = Bench(__doc__, "## FTWT dynamic pruning (bench_ftwt)", runs=TAUS,
              quick={"runs": ["0.9"], "seeds": [0], "steps": 2, "problems": 16, "calib": 32})
bench.option("--seeds", nargs="+", type=int, default=[0])
bench.option("--steps", type=int, default=40, help="head-training steps of every run")
bench.option("--problems", type=int, default=96, help="validation problems evaluated")
bench.option("--calib", type=int, default=256, help="training problems the static cut's mean mass is taken over")


def scored(model, tokenizer, task, problems: int, gate: FTWTGate | None) -> dict:
    if gate is not None:
        gate.reset_stats()
    t0 = time.perf_counter()
    m = evaluate(model, tokenizer, task, "validation", problems, 32, 160, 512)
    out = {"accuracy": m["eval/accuracy"], "val_loss": m["eval/loss"], "eval_s": time.perf_counter() - t0}
    if gate is not None:
        f = gate.flops(model)
        out.update(kept_share=f["ftwt/kept_share"], mlp_skipped=f["ftwt/mlp_flops_skipped"],
                   model_skipped=f["ftwt/model_flops_skipped"])
    return out


class Static:
    """The dense base with a gate in static mode; its mean mass is taken once."""

    def __init__(self, calib: int):
        self.policy = tiny_sft(device="cpu")
        cfg = self.policy.model.config
        self.gate = FTWTGate(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
        self.gate.attach(self.policy.model)
        rows = list(ReasoningTask().split("train"))[:calib]
        batches = [lm_batch(rows[i:i + 32], self.policy.tokenizer, 256) for i in range(0, len(rows), 32)]
        self.mass = mean_mass(self.policy.model, self.gate, batches)

    def matched(self, dynamic: FTWTGate) -> list[int]:
        """Per block: the channels whose 3H multiply-adds equal the dynamic run's (kept + head) per token."""
        s, extra = dynamic.stats, head_macs(dynamic.hidden, dynamic.intermediate, dynamic.rank) / (3 * dynamic.hidden)
        return [round(k / n + extra) for k, n in zip(s.kept, s.tokens)]


def measure(args) -> dict:
    task = ReasoningTask()
    static = Static(args.calib)
    base = static.policy
    static.gate.mode = "dense"
    dense = scored(base.model, base.tokenizer, task, args.problems, None)

    def run(name: str, seed: int) -> dict:
        over = ["algo=ftwt", f"algo.tau={TAUS[name]}", f"seed={seed}", f"algo.head_seed={seed}",
                f"trainer.max_steps={args.steps}", *TRAIN]
        with trained(over, quiet=True) as t:
            policy, gate = load_gated(t.dir)
            row = {"tau": name, "seed": seed, "train_s": t.summary["train/time_s"],
                   "mask_acc": t.summary.get("ftwt/mask_acc"), "bce": t.summary.get("ftwt/bce"),
                   "dynamic": scored(policy.model, policy.tokenizer, task, args.problems, gate)}
        static.gate.mode = "static"
        static.gate.static_masks = static_masks(static.mass, static.matched(gate))
        row["static_kept"] = [int(m.sum()) for m in static.gate.static_masks]
        row["static"] = scored(base.model, base.tokenizer, task, args.problems, static.gate)
        static.gate.mode = "dense"
        return row

    budget = {"steps": args.steps, "problems": args.problems, "calib": args.calib}
    return bench.sweep(run, [(n, s) for s in args.seeds for n in args.runs], ("tau", "seed"),
                       bench.earlier(**budget).get("runs", []), {**budget, "dense": dense}, order=list(TAUS))


# ---------------------------------------------------------------------------- report


def by_tau(result: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in result["runs"]:
        out.setdefault(r["tau"], []).append(r)
    return out


def cell(rows: list[dict], side: str, key: str, pct: bool = True) -> str:
    mean, se = mean_se([r[side][key] for r in rows])
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
    return f(mean) + ("" if se != se else f" ± {100 * se if pct else se:.1f}")


def render(result: dict) -> str:
    n, d = result["problems"], result["dense"]
    lines = [bench.heading, "",
             f"`{result['command']}` on {machine_line(result['machine'])}, {result['date']}. The tiny SFT base; "
             f"FTWT heads (rank 32, decoupled) trained {result['steps']} steps of 16 problems per tau; "
             f"{n} validation problems (accuracy s.e. about {100 * proportion_se(d['accuracy'], n):.1f} points); "
             "FLOPs = multiply-adds counted per token over the evaluation, heads included, not timed. Static = "
             "fixed top-k channels per block by mean |h|, k matched to the dynamic run's MLP FLOPs per block.", "",
             "| run | tau | seeds | greedy accuracy | val loss | channels kept | MLP FLOPs skipped | model FLOPs skipped |"
             " head mask acc (train) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| dense base | - | - | {100 * d['accuracy']:.1f}% | {d['val_loss']:.4f} | 100% | 0 | 0 | - |"]
    for tau, rows in by_tau(result).items():
        acc = mean_se([r["mask_acc"] for r in rows])[0]
        for side in ("dynamic", "static"):
            lines.append(f"| {'FTWT' if side == 'dynamic' else 'static top-k'} | {tau} | {len(rows)} | "
                         f"{cell(rows, side, 'accuracy')} | {cell(rows, side, 'val_loss', pct=False)} | "
                         f"{cell(rows, side, 'kept_share')} | {cell(rows, side, 'mlp_skipped')} | "
                         f"{cell(rows, side, 'model_skipped')} | {f'{100 * acc:.1f}%' if side == 'dynamic' else '-'} |")
    lines += ["", "Training time per run (s): " + ", ".join(f"tau {r['tau']}: {r['train_s']:.0f}" for r in result["runs"])
              + "."]
    return "\n".join(lines)


def plot(result: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    groups = by_tau(result)
    for side, style in (("dynamic", "o-"), ("static", "s--")):
        xs = [100 * mean_se([r[side]["mlp_skipped"] for r in rows])[0] for rows in groups.values()]
        ys = [100 * mean_se([r[side]["accuracy"] for r in rows])[0] for rows in groups.values()]
        ax.plot(xs, ys, style, label="FTWT (per-token masks)" if side == "dynamic" else "static top-k, same FLOPs")
        if side == "dynamic":
            for tau, x, y in zip(groups, xs, ys):
                ax.annotate(f"tau {tau}", (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.scatter([0], [100 * result["dense"]["accuracy"]], color="k", label="dense base", zorder=3)
    ax.set(xlabel="MLP multiply-adds skipped (%)", ylabel="greedy accuracy (%)",
           title="FTWT on the tiny SFT base: accuracy against FLOPs skipped")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bench.save_figure(fig, "ftwt.png")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    bench.main(measure, render, plot)
