"""Domain-specific pruning: D-Pruner against magnitude, Wanda and its own limits, on SmolLM2.

    make bench-dpruner                              # = python scripts/bench_dpruner.py (about 30 minutes)
    python scripts/bench_dpruner.py --runs wanda dpruner
    python scripts/bench_dpruner.py --report        # re-render the table and plot from the JSON

The packaged SmolLM2-135M-Instruct is pruned to 50% (every attention/MLP linear layer). The
domain is the reasoning task (question prompts); the open-domain set is Shakespeare's text. Each
run is `rlx prune ... calib.general=shakespeare`, so every row reports what the method costs on
both: the task's accuracy and perplexity on its validation split, and the perplexity of held-out
Shakespeare. Rows: the dense model; magnitude; Wanda; D-Pruner with lam=0 (the domain-only
Taylor/Fisher score) and with the generality penalty at lam=1 (the default) and lam=10.

Writes docs/results/bench_dpruner.json, the "Domain pruning" section of docs/RESULTS.md and
docs/dpruner.png.
"""
from __future__ import annotations

from rlx.benchmark import Bench, compressed, keep, pyplot

COMMON = ["model=smollm2", "data.prompt_style=question", "calib.general=shakespeare", "calib.samples=32",
          "calib.batch_size=8", "calib.max_length=256", "eval.samples=64", "eval.batch_size=16",
          "eval.max_new_tokens=96", "eval.max_length=384", "progress=false"]
RUNS = {
    "dense": ["method=magnitude", "sparsity=0.0"],
    "magnitude": ["method=magnitude"],
    "wanda": ["method=wanda"],
    "dpruner_lam0": ["method=dpruner", "method.lam=0"],
    "dpruner": ["method=dpruner"],
    "dpruner_lam10": ["method=dpruner", "method.lam=10"],
}
KEEP = ("sparsity", "prune_s", "eval/accuracy", "eval/perplexity", "general/perplexity")
QUICK = ["calib.samples=4", "eval.samples=4", "eval.max_new_tokens=16"]
bench = Bench(__doc__, "## Domain pruning (bench_dpruner)", runs=RUNS, quick={"runs": ["magnitude"]})


def measure(args) -> dict:
    def run(name: str) -> dict:
        summary = compressed("prune", [*COMMON, *RUNS[name], *(QUICK if args.quick else [])])
        return {"run": name, "overrides": RUNS[name], **keep(summary, KEEP)}

    return bench.sweep(run, args.runs, ("run",), bench.load().get("runs", []), order=list(RUNS),
                       show=("eval/accuracy", "eval/perplexity", "general/perplexity"))


def render(result: dict) -> str:
    m = result["machine"]
    lines = [bench.heading, "",
             f"`make bench-dpruner` (`{result['command']}`) on {m['cpu']} ({m['cpu_count']} cores), {result['date']}. "
             "SmolLM2-135M-Instruct pruned to 50% per layer; 32 calibration examples of each set (256 tokens); "
             "domain = the reasoning task (question prompts, 64 validation problems), general = held-out "
             "Shakespeare (64 chunks).", "",
             "| run | overrides | domain accuracy | domain ppl | general ppl | sparsity | time s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['run']} | `{' '.join(r['overrides'])}` | {r['eval/accuracy']:.1%} | "
                     f"{r['eval/perplexity']:.3f} | {r['general/perplexity']:.2f} | {r['sparsity']:.2f} | "
                     f"{r['prune_s']:.0f} |")
    return "\n".join(lines)


def plot(result: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    for r in result["runs"]:
        ax.scatter(r["general/perplexity"], r["eval/perplexity"], s=40)
        ax.annotate(r["run"], (r["general/perplexity"], r["eval/perplexity"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel="general perplexity (held-out Shakespeare)",
           ylabel="domain perplexity (reasoning task)", title="SmolLM2-135M at 50% sparsity: lower left is better")
    ax.grid(alpha=0.3)
    bench.save_figure(fig, "dpruner.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
