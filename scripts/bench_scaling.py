"""Data parallelism under torchrun: throughput of the same SFT steps on 1 and 2 processes, and what
each strategy sends between ranks per step.

    python scripts/bench_scaling.py                  # every run (about 3 minutes on 2 CPU cores)
    python scripts/bench_scaling.py --runs single ddp_1
    python scripts/bench_scaling.py --report         # re-render the table from the JSON

Every run trains the tiny model (1.8M parameters) with SFT on the reasoning task for the same
optimizer steps of 32 examples each, fp32 on the CPU (gloo) or on the GPUs where there are:
    single    one process, micro-batch 16 x grad_accum 2 (trainer.strategy=single)
    ddp_1     torchrun, 1 process, the same steps under trainer.strategy=ddp: DDP's own overhead
    ddp_2     torchrun, 2 processes x micro-batch 16 (trainer.strategy=ddp)
    fsdp2_2   torchrun, 2 processes x micro-batch 16 (trainer.strategy=fsdp2)
All four train on the same micro-batches in the same order (tests/test_distributed.py checks the
weights agree), so their final losses agree and tokens/s compare like for like. Reported: tokens/s
over the training steps (rlx's train/tokens_per_s: evaluation and saving excluded), its ratio to
`single`, the wall time, and the bytes each rank sends per step, computed from the parameter count
for ring collectives: DDP all-reduces the gradients (2(N-1)/N x 4 bytes x parameters); FSDP2
all-gathers the weights in the forward and again in the backward and reduce-scatters the gradients
(3(N-1)/N x 4 bytes x parameters). Writes docs/results/bench_scaling.json and the "Data
parallelism" section of docs/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rlx.benchmark import Bench, machine_line

COMMON = ["model=tiny", "trainer.eval_every=0", "trainer.save_every=0", "trainer.eval_samples=0",
          "trainer.progress=false", "trainer.log_every=10"]
RUNS = {  # (processes, overrides)
    "single": (1, ["trainer.micro_batch_size=16", "trainer.grad_accum=2"]),
    "ddp_1": (1, ["trainer.strategy=ddp", "trainer.micro_batch_size=16", "trainer.grad_accum=2"]),
    "ddp_2": (2, ["trainer.strategy=ddp", "trainer.micro_batch_size=16", "trainer.grad_accum=1"]),
    "fsdp2_2": (2, ["trainer.strategy=fsdp2", "trainer.micro_batch_size=16", "trainer.grad_accum=1"]),
}
bench = Bench(__doc__, "## Data parallelism (bench_scaling)", runs=RUNS, quick={"steps": 5})
bench.option("--steps", type=int, default=100, help="optimizer steps of every run")


def sent_bytes_per_step(name: str, params: float) -> float:
    """Bytes one rank sends per optimizer step, ring collectives, fp32 (0 for one process)."""
    n, _ = RUNS[name]
    if n == 1:
        return 0.0
    passes = 3 if name.startswith("fsdp2") else 2
    return passes * (n - 1) / n * 4 * params


def run(name: str, steps: int) -> dict:
    n, overrides = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [*COMMON, *overrides, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]
        if overrides[0].startswith("trainer.strategy="):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "-m", "rlx", "train", *args]
        else:
            cmd = [sys.executable, "-m", "rlx", "train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}  # one core share per rank
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        s = json.loads((run_dir / "summary.json").read_text())
    params = s["params_M"] * 1e6
    return {"name": name, "processes": n, "steps": steps, "overrides": overrides, "params_M": s["params_M"],
            "tokens_per_s": s["train/tokens_per_s"], "train_s": s["train/time_s"], "wall_s": s["wall_time_s"],
            "loss": s["train/loss"], "tokens": s["train/tokens"],
            "sent_MB_per_step": sent_bytes_per_step(name, params) / 2**20}


def measure(args) -> dict:
    items = [(n, args.steps) for n in args.runs]
    return bench.sweep(run, items, ("name",), bench.earlier(steps=args.steps).get("runs", []), {"steps": args.steps},
                       order=list(RUNS), show=("tokens_per_s", "loss"))


def render(result: dict) -> str:
    runs = {r["name"]: r for r in result["runs"]}
    base = runs.get("single")
    lines = [bench.heading, "",
             f"`{result['command']}`, {result['date']}, {machine_line(result['machine'])}. SFT of the tiny model "
             f"(1.8M parameters), {result['steps']} steps of 32 examples, fp32; every run sees the same micro-batches "
             "in the same order. Sent per step: bytes per rank for ring collectives, computed from the parameter "
             "count (DDP: one gradient all-reduce; FSDP2: two weight all-gathers and one gradient reduce-scatter).", "",
             "| run | processes | tokens / s | vs `single` | train s | wall s | final loss | sent MB / step / rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in RUNS:
        r = runs.get(name)
        if r is None:
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"| `{name}` | {r['processes']} | {r['tokens_per_s']:.0f} | {ratio} | {r['train_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['loss']:.4f} | {r['sent_MB_per_step']:.1f} |")
    cpus = result["machine"].get("cpu_count")
    lines += ["", f"On this machine ({cpus} CPU cores) two processes share the cores one process already uses "
              "(each rank gets half the threads), so data parallelism cannot speed up the work here; what the table "
              "shows is its overhead: DDP's reducer and FSDP2's gathers on the same arithmetic. On GPUs, where each "
              "rank has its own device, `ddp_1` against `single` is DDP's cost on one GPU and the 2-process runs "
              "scale with the devices (not yet measured here). Each rank runs with cores / ranks torch threads: with "
              "as many threads as cores beside another busy process, `ddp_1` ran 7x slower than `single` (DDP's "
              "communication thread against spinning OpenMP threads). FSDP2's final loss differs from the others' "
              "because its reduce-scatter adds the ranks' gradients in another order: equal to 1e-6 per step "
              "(tests/test_distributed.py), a different trajectory after a hundred steps."]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.main(measure, render)
