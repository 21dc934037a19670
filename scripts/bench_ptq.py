"""Post-training compression: RTN, GPTQ, BAQ and torchao's HQQ (the library peer) at 2, 3 and 4
bits, and magnitude and Wanda pruning at 50% and 2:4, on the embedded models.

    make bench-ptq                                      # = python scripts/bench_ptq.py (about 40 minutes)
    python scripts/bench_ptq.py --models tiny_lm --bits 2 3 --methods gptq baq
    python scripts/bench_ptq.py --methods                # pruning only
    python scripts/bench_ptq.py --report                # re-render the table and plot from the JSON

Three models: `tiny_lm`, the default tiny model pretrained on Shakespeare for 1,000 steps (built
here once and cached), scored by validation perplexity on held-out text; `tiny_sft`, the SFT
base (built on first use), scored by greedy accuracy on the reasoning task; and `smollm2`, the packaged
SmolLM2-135M-Instruct, calibrated on 16 Shakespeare chunks and scored by perplexity on 64 held-out
ones. The tiny models calibrate on 128 training examples of their own data. Every attention/MLP
linear layer is quantized per output row (no groups). Reported: the evaluation, the mean relative output error of the
layers on the calibration inputs, the achieved average bits, the packed size and the time.

Writes docs/results/bench_ptq.json, the "Post-training quantization" section of docs/RESULTS.md
and docs/ptq_bits.png.
"""
from __future__ import annotations

from pathlib import Path

from rlx.benchmark import Bench, compressed, keep, pyplot, upsert
from rlx.paths import cache_dir

METHODS = ("rtn", "gptq", "baq", "hqq")
PRUNINGS = {"magnitude_50": ["method=magnitude", "sparsity=0.5"], "wanda_50": ["method=wanda", "sparsity=0.5"],
            "magnitude_2:4": ["method=magnitude", "n_m=[2,4]"], "wanda_2:4": ["method=wanda", "n_m=[2,4]"]}
MODELS = {
    "tiny_lm": ["data=shakespeare", "calib.max_length=256", "eval.samples=128", "eval.max_length=256",
                "eval.batch_size=16"],
    "tiny_sft": ["data=reasoning", "eval.samples=256"],
    # the packaged pretrained model: its own text is not at hand, so it calibrates on and is scored by Shakespeare
    "smollm2": ["data=shakespeare", "calib.samples=16", "calib.batch_size=8", "calib.max_length=256",
                "eval.samples=64", "eval.batch_size=16", "eval.max_length=256"],
}
METRIC = {"tiny_lm": "eval/perplexity", "tiny_sft": "eval/accuracy", "smollm2": "eval/perplexity"}
KEEP = ("average_bits", "packed_MB", "mean_relative_error", "quantize_s", "sparsity", "prune_s", "eval/loss",
        "eval/perplexity", "eval/accuracy")
QUICK = ["calib.samples=8", "eval.samples=8"]
bench = Bench(__doc__, "## Post-training quantization (bench_ptq)",
              quick={"models": ["tiny_sft"], "bits": [4], "methods": ["rtn", "gptq"], "skip_prune": True})
bench.option("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
bench.option("--bits", nargs="+", type=int, default=[2, 3, 4])
bench.option("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
             help="quantization methods (none: pruning only); rtn adds the fp row")
bench.option("--skip-prune", action="store_true", help="no pruning rows")


def tiny_lm() -> Path:
    """The tiny model pretrained on Shakespeare (cached): the LM the perplexity rows quantize."""
    from rlx.config import compose_config
    from rlx.tasks import run_training

    path = cache_dir() / "models" / "tiny-shakespeare"
    if not (path / "checkpoints" / "last").exists():
        run_training(compose_config("train", [
            "model=tiny", "data=shakespeare", "algo=sft", "algo.max_length=256", "trainer.eval_max_length=256",
            "trainer.micro_batch_size=8", "trainer.max_steps=1000", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.eval_samples=16", "trainer.progress=false"]), path)
    return path / "checkpoints" / "last"


def source(model: str) -> str:
    """The override that picks the model: a cached checkpoint, or the packaged SmolLM2."""
    if model == "smollm2":
        return "model=smollm2"
    return f"checkpoint={tiny_lm() if model == 'tiny_lm' else cache_dir() / 'models' / 'tiny-sft'}"


def measure(args) -> dict:
    earlier = bench.load()
    runs, pruning = earlier.get("runs", []), earlier.get("pruning", [])
    result = {**earlier, "runs": runs, "pruning": pruning}
    quick = QUICK if args.quick else []
    for model in args.models:
        common = [source(model), *MODELS[model], "progress=false", *quick]
        for name in [] if args.skip_prune else PRUNINGS:
            r = {"model": model, "pruning": name, **keep(compressed("prune", [*common, *PRUNINGS[name]]), KEEP)}
            print(f"{model} {name}: {METRIC[model]} {r[METRIC[model]]:.4g}", flush=True)
            pruning = upsert(pruning, r, "model", "pruning")
        result = bench.record(runs=runs, pruning=pruning)
        fp = [("rtn", 16)] if "rtn" in args.methods else []
        for method, bits in [*fp, *((m, b) for b in args.bits for m in args.methods)]:
            s = compressed("quantize", [*common, f"method={method}", f"bits={bits}"])
            r = {"model": model, "method": method, "bits": bits, **keep(s, KEEP)}
            print(f"{model} {method} {bits}: {METRIC[model]} {r[METRIC[model]]:.4g} "
                  f"error {r['mean_relative_error']:.2e}", flush=True)
            runs = upsert(runs, r, "model", "method", "bits")
            result = bench.record(runs=runs, pruning=pruning)
    return result


def render(result: dict) -> str:
    rows = result["runs"]
    m = result["machine"]
    lines = [bench.heading, "",
             f"`make bench-ptq` (`{result['command']}`) on {m['cpu']} ({m['cpu_count']} cores), {result['date']}. "
             "Per-row grids; 128 calibration examples (SmolLM2: 16 Shakespeare chunks); `fp` is the model before "
             "quantization (RTN at 16 bits). "
             "Relative error: mean over layers of ‖(W − Q)X‖² / ‖WX‖² on the calibration inputs.", ""]
    for model in MODELS:
        these = [r for r in rows if r["model"] == model]
        if not these:
            continue
        metric = METRIC[model]
        lines += [f"`{model}` ({metric}):", "", "| bits | method | " + metric + " | rel. error | avg bits | packed MB | time s |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for r in sorted(these, key=lambda r: (-r["bits"], METHODS.index(r["method"]) if r["method"] in METHODS else -1)):
            label = "fp" if r["bits"] == 16 else r["method"]
            lines.append(f"| {r['bits']} | {label} | {r[metric]:.4g} | {r['mean_relative_error']:.2e} | "
                         f"{r['average_bits']:.2f} | {r['packed_MB']:.2f} | {r['quantize_s']:.1f} |")
        lines.append("")
        pruned = [r for r in result.get("pruning", []) if r["model"] == model]
        if pruned:
            lines += [f"`{model}` pruned ({metric}):", "", f"| pruning | {metric} | rel. error | sparsity | time s |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['pruning']} | {r[metric]:.4g} | {r['mean_relative_error']:.2e} | {r['sparsity']:.2f} | "
                      f"{r['prune_s']:.1f} |" for r in pruned]
            lines.append("")
    return "\n".join(lines).rstrip()


def plot(result: dict) -> None:
    fig, axes = pyplot().subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4))
    for ax, model in zip(axes, MODELS):
        for method in METHODS:
            pts = sorted((r["bits"], r[METRIC[model]]) for r in result["runs"]
                         if r["model"] == model and r["method"] == method and r["bits"] < 16)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        fp = [r[METRIC[model]] for r in result["runs"] if r["model"] == model and r["bits"] == 16]
        if fp:
            ax.axhline(fp[0], color="gray", linestyle="--", label="fp")
        ax.set(xlabel="average bits per weight", ylabel=METRIC[model], title=model)
        if METRIC[model] == "eval/perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    bench.save_figure(fig, "ptq_bits.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
