"""Memory-efficient optimizers at equal tokens: validation perplexity against optimizer memory.

    make bench-optim                                    # = python scripts/bench_optim.py (about 45 minutes)
    python scripts/bench_optim.py --runs adamw frugal_svd --steps 200
    python scripts/bench_optim.py --report              # re-render the tables and plot from the JSON

Pretraining: every run trains `model=tiny` (1.8M parameters, random init, seed 0) with `algo=sft` on
`data=shakespeare` for the same steps and tokens, at the LR each method's paper uses relative to
AdamW (FRUGAL keeps AdamW's; GaLore and Fira use a larger one with the low-rank update scaled by
0.25; Lion a third), the cosine schedule and `update_gap=50` for every projection method (the
papers refresh every 200 of 10k+ steps; at 500 steps that would be two refreshes). The peers run
the same work: galore-torch's GaLoreAdamW and the fira package's FiraAdamW (scripts/_peers.py),
bitsandbytes' and torchao's 8-bit AdamW. Reported: validation perplexity on held-out text,
optimizer-state MB after step 1, the peak MB of that step (weights, state, gradients, activations)
and the mean step time of the run.

Fine-tuning: the SFT base (`model=tiny_sft`, `make base`) trained further on longer sums than it
saw (chains of 5-6 terms; it was trained on 2-4 and solves 5% of these) with full AdamW, LoRA, Bone
(peft's MiSS) and FRUGAL at a similar state size, reporting greedy answer accuracy on 256
validation problems.

Writes docs/results/bench_optim.json (kept across invocations with the same steps), the
"Memory-efficient optimizers" section of docs/RESULTS.md and docs/optim_pareto.png.
"""
from __future__ import annotations

from rlx.benchmark import Bench, keep, metric, pyplot, trained

LENGTH = 256
PRETRAIN = ["model=tiny", "data=shakespeare", "algo=sft", f"algo.max_length={LENGTH}",
            f"trainer.eval_max_length={LENGTH}", "trainer.micro_batch_size=8", "trainer.eval_every=0",
            "trainer.save_every=0", "trainer.log_every=10", "trainer.progress=false", "trainer.eval_samples=128",
            "trainer.eval_batch_size=16"]
GAP = ["optimizer.update_gap=50"]
PEER = ["optimizer.density=0.25", "optimizer.update_gap=50", "optimizer.scale=0.25", "optimizer.lr=1e-2",
        "optimizer.betas=[0.9,0.95]", "optimizer.eps=1e-8", "optimizer.weight_decay=0.0", "~optimizer.state_free",
        "~optimizer.state_free_lr_scale", "~optimizer.projector", "~optimizer.reset_on_refresh",
        "~optimizer.fira_gamma", "~optimizer.seed"]
PRETRAIN_RUNS = {
    "adamw": ["optimizer=adamw"],
    "adamw_lr6e-3": ["optimizer=adamw", "optimizer.lr=6e-3"],
    "adamw_lr1e-2": ["optimizer=adamw", "optimizer.lr=1e-2"],
    "adamw8bit_bnb": ["optimizer=adamw8bit", "optimizer.lr=3e-3"],
    "adamw8bit_torchao": ["optimizer=adamw8bit_ao", "optimizer.lr=3e-3"],
    "galore": ["optimizer=galore", *GAP],
    "galore_torch": ["optimizer=fira", "optimizer._target_=_peers.galore_torch_adamw", *PEER],
    "frugal_svd": ["optimizer=frugal", "optimizer.projector=svd", *GAP],
    "frugal_block": ["optimizer=frugal", "optimizer.projector=block", *GAP],
    "frugal_0": ["optimizer=frugal", "optimizer.density=0", *GAP],
    "fira": ["optimizer=fira", *GAP],
    "fira_package": ["optimizer=fira", "optimizer._target_=_peers.fira_package_adamw", *PEER],
    "lion": ["optimizer=lion", "optimizer.lr=1e-3"],
    "lion_k_nuclear": ["optimizer=lion_k", "optimizer.kernel=nuclear", "optimizer.lr=1e-1"],
    "lost": ["optimizer=adamw", "model.parameterization=lost"],
    "trp": ["optimizer=adamw", "hooks=trp", "hooks.trp.period=10"],
}
FINETUNE = ["model=tiny_sft", "data=reasoning", "data.min_terms=5", "data.max_terms=6", "algo=sft", "trainer.micro_batch_size=32",
            "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=10", "trainer.progress=false",
            "trainer.eval_samples=256", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=20"]
ALL_LINEAR = "target_modules:[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
FINETUNE_RUNS = {
    "ft_base": ["optimizer=adamw", "optimizer.lr=0.0"],  # one step at LR 0: the SFT base as it is
    "ft_adamw": ["optimizer=adamw", "optimizer.lr=3e-4"],
    "ft_lora": ["optimizer=adamw", "optimizer.lr=3e-3", f"model.lora={{r:16,lora_alpha:32,{ALL_LINEAR}}}"],
    "ft_bone": ["optimizer=adamw", "optimizer.lr=3e-3", f"model.lora={{peft_type:MISS,r:32,{ALL_LINEAR}}}"],
    "ft_frugal": ["optimizer=frugal", "optimizer.lr=3e-4", "optimizer.projector=svd", "optimizer.rank=16",
                  "optimizer.state_free_lr_scale=0.1", *GAP],
    # the adapters' LR for the full-weight methods too
    "ft_adamw_lr3e-3": ["optimizer=adamw", "optimizer.lr=3e-3"],
    "ft_frugal_lr3e-3": ["optimizer=frugal", "optimizer.lr=3e-3", "optimizer.projector=svd", "optimizer.rank=16",
                         "optimizer.state_free_lr_scale=0.1", *GAP],
}
RUNS = {**PRETRAIN_RUNS, **FINETUNE_RUNS}
KEEP = ("memory/optimizer_MB", "memory/held_MB", "memory/weights_MB", "memory/step_peak_MB", "train/tokens",
        "eval/loss", "eval/perplexity", "eval/accuracy", "params_M")


bench = Bench(__doc__, "## Memory-efficient optimizers (bench_optim)", runs=RUNS,
              quick={"runs": ["adamw", "frugal_svd", "ft_base"], "steps": 20, "finetune_steps": 5})
bench.option("--steps", type=int, default=500, help="pretraining steps")
bench.option("--finetune-steps", type=int, default=300)


def run(name: str, steps: int) -> dict:
    base = FINETUNE if name in FINETUNE_RUNS else PRETRAIN
    with trained([*base, *RUNS[name], f"trainer.max_steps={steps}"]) as t:
        s = t.summary
        return {"name": name, "overrides": RUNS[name], "steps": steps, "wall_s": s["wall_time_s"],
                "step_s": s["train/time_s"] / steps, **keep(s, KEEP), **keep(s, [k for k in s if k.startswith("trp/export")]),
                "curve": metric(t.rows, "train/loss", steps=True)}


def measure(args) -> dict:
    steps = lambda name: (1 if name == "ft_base" else args.finetune_steps) if name in FINETUNE_RUNS else args.steps
    return bench.sweep(lambda name: run(name, steps(name)), args.runs, ("name",),
                       bench.earlier(steps=args.steps).get("runs", []), {"steps": args.steps}, order=list(RUNS),
                       show=("eval/perplexity", "eval/accuracy", "memory/optimizer_MB", "memory/step_peak_MB", "step_s"))


def perplexity(r: dict) -> float:
    return metric(r, "eval/perplexity")


def render(result: dict) -> str:
    runs = {r["name"]: r for r in result["runs"]}
    m = result["machine"]
    lines = [bench.heading, "",
             f"`make bench-optim` (runs kept across invocations with the same steps; the last: `{result['command']}`) "
             f"on {m['cpu']} ({m['cpu_count']} cores), {result['date']}."]
    base = runs.get("adamw")
    pre = [runs[n] for n in PRETRAIN_RUNS if n in runs]
    tuned = min((r for r in pre if r["name"].startswith("adamw") and "8bit" not in r["name"]), key=perplexity,
                default=None)
    if pre:
        tokens = pre[0].get("train/tokens", 0)
        lines += ["", f"Pretraining `model=tiny` on `data=shakespeare`, {result['steps']} steps ({tokens:,} tokens) "
                  "each. Perplexity on 128 held-out chunks; optimizer state after step 1; the peak of that step; "
                  "step time over the run. Δ ppl against the best AdamW of the LR sweep"
                  f" (`{tuned['name'] if tuned else '-'}`); state and time against AdamW.", "",
                  "| run | val ppl | Δ ppl vs best AdamW | optimizer MB | state vs AdamW | step peak MB | step s | time vs AdamW |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pre:
            d = f"{perplexity(r) - perplexity(tuned):+.2f}" if tuned and r is not tuned else ""
            s = f"{r['memory/optimizer_MB'] / base['memory/optimizer_MB']:.2f}×" if base else ""
            t = f"{r['step_s'] / base['step_s']:.2f}×" if base else ""
            lines.append(f"| `{r['name']}` | {perplexity(r):.2f} | {d} | {r['memory/optimizer_MB']:.2f} | {s} | "
                         f"{r['memory/step_peak_MB']:.1f} | {r['step_s']:.3f} | {t} |")
    trp = runs.get("trp", {})
    if "trp/export_params_ratio" in trp:
        lines += ["", f"`trp` exports its attention/MLP layers as thin factors holding "
                  f"{trp['trp/export_params_ratio']:.2f}× their dense parameters (relative reconstruction error "
                  f"{trp['trp/export_relative_error']:.3f}); the perplexity above is of the trained weights before the export."]
    ft = [runs[n] for n in FINETUNE_RUNS if n in runs]
    if ft:
        lines += ["", f"Fine-tuning the SFT base on 5-6-term sums (it was trained on 2-4), {ft[-1]['steps']} steps (`ft_base`: none): greedy accuracy on 256 "
                  "validation problems; optimizer state and held MB (weights, adapters, state) after step 1.", "",
                  "| run | accuracy | val loss | trainable M | optimizer MB | held MB | step peak MB | step s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ft:
            lines.append(f"| `{r['name']}` | {metric(r, 'eval/accuracy'):.3f} | {r['eval/loss']:.3f} | "
                         f"{metric(r, 'params_M', 0):.3f} | {r['memory/optimizer_MB']:.2f} | {r['memory/held_MB']:.2f} | "
                         f"{r['memory/step_peak_MB']:.1f} | {r['step_s']:.3f} |")
    lines += ["", "Overrides per run: " + "; ".join(f"`{r['name']}`: `{' '.join(r['overrides'])}`"
                                                   for r in result["runs"]) + "."]
    return "\n".join(lines)


def plot(result: dict) -> None:
    pre = [r for r in result["runs"] if r["name"] in PRETRAIN_RUNS]
    if not pre:
        return
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for r in pre:
        peer = r["name"] in ("galore_torch", "fira_package", "adamw8bit_bnb", "adamw8bit_torchao")
        ax.scatter(r["memory/optimizer_MB"], perplexity(r), marker="s" if peer else "o", s=36)
        ax.annotate(r["name"], (r["memory/optimizer_MB"], perplexity(r)), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set(xlabel="optimizer state (MB)", ylabel="validation perplexity",
           title=f"model=tiny, {result['steps']} steps on shakespeare (squares: peer libraries)")
    ax.grid(alpha=0.3)
    bench.save_figure(fig, "optim_pareto.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
