"""A first tour of rlx on a CPU: what a researcher runs to decide whether rlx is for them.

    make demo                                  # = python scripts/demo.py  (8 min on 2 CPU cores, +5-10 to build the base)
    python scripts/demo.py --out outputs/demo  # where the runs, plots and report go

On the embedded default (the tiny model, the reasoning task), one after the other:
1. the SFT base every RL, preference and compression run starts from (built once, then cached);
2. length-efficient RL against plain GRPO from that base: DLER's truncation penalty and batch-wise
   reward normalization against GRPO, the same prompts, samples and steps;
3. post-training quantization at 3 bits: BAQ's per-column bit allocation against GPTQ;
4. memory-efficient training: FRUGAL (state-full Adam on a quarter of the rows, signSGD on the rest)
   against AdamW, pretraining the tiny model on the same tokens.

Writes <out>/report.md with a table per part and the training curves as PNGs beside it. Every
number comes from this machine's runs; nothing is copied from docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rlx.base import base_dir, ensure_base, is_built
from rlx.compress.run import run_quantize
from rlx.config import compose_config
from rlx.plots import plot_runs, read_metrics
from rlx.tasks import run_training

RL = ["model=tiny_sft", "trainer.micro_batch_size=16", "optimizer.lr=3e-5", "trainer.warmup_steps=0",
      "trainer.lr_scheduler=constant", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=5",
      "trainer.eval_samples=256", "algo.group_size=8", "algo.minibatches=2"]
RL_RUNS = {"grpo": ["algo=grpo", "algo.max_new_tokens=128"], "dler": ["algo=dler"]}
QUANT = ["bits=3", "calib.samples=128", "eval.samples=256", "progress=false"]
OPTIM = ["model=tiny", "data=shakespeare", "algo=sft", "algo.max_length=256", "trainer.eval_max_length=256",
         "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=10",
         "trainer.eval_samples=64"]


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def part_base(out: Path) -> list[str]:
    t0 = time.perf_counter()
    existed = is_built()
    ensure_base()
    import json

    info = json.loads((base_dir() / "base.json").read_text())
    took = "cached" if existed else f"built in {(time.perf_counter() - t0) / 60:.1f} min"
    return ["## 1. The SFT base", "",
            f"`model=tiny` (1.8M parameters) after {info.get('steps', '?')} SFT steps on the reasoning task ({took}): "
            f"greedy accuracy **{info.get('eval/accuracy', float('nan')):.1%}** on the validation problems, "
            f"{info.get('eval/response_len', float('nan')):.0f} tokens per answer. Every run below starts from it.", ""]


def part_rl(out: Path, steps: int) -> list[str]:
    rows, runs = [], []
    for name, extra in RL_RUNS.items():
        run_dir = out / "rl" / name
        s = run_training(compose_config("train", [*RL, *extra, f"trainer.max_steps={steps}"]), run_dir)
        runs.append(run_dir)
        sampled = [r["rl/response_len"] for r in read_metrics(run_dir) if "rl/response_len" in r]
        rows.append(f"| {name} | {fmt(s.get('eval/accuracy'), '.1%')} | {fmt(s.get('eval/response_len'), '.1f')} | "
                    f"{sampled[0]:.1f} -> {sampled[-1]:.1f} | {s['wall_time_s'] / 60:.1f} |")
    plot_runs(runs, ["rl/accuracy", "rl/response_len", "reward/mean"], out / "rl_curves.png")
    return ["## 2. Length-efficient RL: DLER against GRPO", "",
            f"From the SFT base, {steps} optimizer steps each (16 prompts x 8 samples per rollout, lr 3e-5); "
            "greedy accuracy and answer length on the 256 validation problems at the end, and the length of the "
            "sampled training responses (T = 1) in the first and last logging window: the length methods act on "
            "the sampled answers, which are longer than the greedy ones.", "",
            "| run | accuracy | greedy tokens per answer | sampled tokens per answer | minutes |",
            "|---|---:|---:|---:|---:|", *rows, "",
            "![RL training curves](rl_curves.png)", ""]


def part_quant(out: Path) -> list[str]:
    rows = []
    for method in ("gptq", "baq"):
        s = run_quantize(compose_config("quantize", [f"method={method}", *QUANT]), out / "quantize" / method)
        rows.append(f"| {method} | {s['average_bits']:.2f} | {s['mean_relative_error']:.4f} | "
                    f"{fmt(s.get('eval/accuracy'), '.1%')} | {s['packed_MB']:.2f} |")
    return ["## 3. Post-training quantization at 3 bits: BAQ against GPTQ", "",
            "The SFT base quantized with 128 calibration problems; accuracy on the 256 validation problems.", "",
            "| method | average bits | output error (relative) | accuracy | packed MB |", "|---|---:|---:|---:|---:|",
            *rows, ""]


def part_optim(out: Path, steps: int) -> list[str]:
    rows, runs = [], []
    for name in ("adamw", "frugal"):
        run_dir = out / "optim" / name
        s = run_training(compose_config("train", [*OPTIM, f"optimizer={name}", f"trainer.max_steps={steps}"]), run_dir)
        runs.append(run_dir)
        rows.append(f"| {name} | {s['eval/loss']:.3f} | {s['memory/optimizer_MB']:.2f} | {s['wall_time_s'] / 60:.1f} |")
    plot_runs(runs, ["train/loss"], out / "optim_curves.png")
    return ["## 4. Memory-efficient optimizers: FRUGAL against AdamW", "",
            f"Pretraining `model=tiny` from a random init on Shakespeare for {steps} steps (8 x 256 tokens each); "
            "validation loss at the end and the optimizer state held.", "",
            "| optimizer | validation loss | optimizer state MB | minutes |", "|---|---:|---:|---:|", *rows, "",
            "![pretraining loss](optim_curves.png)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--rl-steps", type=int, default=60)
    parser.add_argument("--optim-steps", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines = ["# rlx demo", ""]
    for part in (lambda: part_base(args.out), lambda: part_rl(args.out, args.rl_steps), lambda: part_quant(args.out),
                 lambda: part_optim(args.out, args.optim_steps)):
        lines += part()
        (args.out / "report.md").write_text("\n".join(lines) + "\n")  # after every part: nothing lost if stopped
    lines.append(f"Total: {(time.perf_counter() - t0) / 60:.1f} minutes.")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"\nreport: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
