"""GLOW in miniature: positive-only SFT vs unfiltered SFT vs unfiltered + GLOW, in and out of domain.

    python scripts/bench_glow.py                       # 4 runs x --seeds (see the docstring's timing)
    python scripts/bench_glow.py --seeds 0 1 2 --runs positive unfiltered_glow
    python scripts/bench_glow.py --report              # re-render the section and plot from the JSON

The paper ("Learning from Mistakes", arXiv 2601.04992) fine-tunes on unfiltered chain-of-thought
trajectories (right and wrong final answers) and reports better out-of-domain accuracy than
positive-only SFT, more so with GLOW's gain-based weights, and a higher policy entropy.

Here every run starts from the SFT base (`model=tiny_sft`: chain_sum, 2-4 one-digit terms, ~82%
greedy), not from `model=tiny`: the claim is about fine-tuning a model that can already reason,
and a random init would spend the whole budget learning the format. All runs train the same
steps on the same `--problems` problems of `data=reasoning_unfiltered` (chain_sum, 2-4 terms, the
base's own family), several epochs, so GLOW's history has revisits to act on:
    base             no training (the reference)
    positive         data.negatives=0: each problem's correct trace
    unfiltered       data.negatives=1: the correct trace and the slipped wrong one of every problem
    unfiltered_glow  the same data, weighting=glow (alpha 2, beta 10, clamp [0.5, 5])
Measured on the final checkpoint, by greedy decoding (rlx's sampler at temperature 0):
    in-domain      accuracy on --eval problems of the training family (the data's validation split)
    out-of-domain  accuracy on --eval chain_sum problems of 2-3 terms with up to 2-digit numbers
                   (max_digits=2): never trained on (the base saw only one-digit numbers), and partly
                   solved by the base (about half), so it can move either way. Numbers are drawn with
                   1-2 digits, so a few problems may be one-digit only.
    entropy        the policy's mean next-token entropy (nats) over its own greedy responses
Differences to positive-only are paired per problem (same problems, pooled over seeds) with their
standard error. Writes docs/results/bench_glow.json, the "GLOW" section of docs/RESULTS.md and
docs/glow.png.
"""
from __future__ import annotations

import time

import torch

from rlx.benchmark import Bench, metric, pyplot, trained
from rlx.evaluate import mean_se, paired_difference

COMMON = ["model=tiny_sft", "data=reasoning_unfiltered", "data.min_terms=2", "data.max_terms=4", "data.max_digits=1",
          "trainer.micro_batch_size=16", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=10",
          "optimizer.lr=1e-3", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=5",
          "trainer.progress=false", "trainer.eval_samples=8", "trainer.eval_max_new_tokens=48"]
RUNS = {
    "base": None,
    "positive": ["data.negatives=0"],
    "unfiltered": ["data.negatives=1"],
    "unfiltered_glow": ["data.negatives=1", "weighting=glow"],
}
OOD = {"min_terms": 2, "max_terms": 3, "max_digits": 2}
MAX_NEW = 48  # the longest traces here (3 steps, "#### answer") are under 45 characters

bench = Bench(__doc__, "## GLOW: negative samples and gain-based weighting (bench_glow)", runs=RUNS,
              quick={"steps": 6, "problems": 40, "eval": 16, "seeds": [0]})
bench.option("--steps", type=int, default=120, help="optimizer steps of every trained run")
bench.option("--problems", type=int, default=200, help="training problems (unfiltered data: twice as many examples)")
bench.option("--eval", type=int, default=128, help="problems per evaluation set")
bench.option("--seeds", type=int, nargs="+", default=[0], help="training seeds (data order); the problems stay fixed")


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy(model, tokenizer, task, examples: list[dict], batch_size: int = 64) -> tuple[list[bool], float]:
    """Per problem whether the greedy answer is right, and the mean next-token entropy over the responses."""
    from rlx.data.collate import prompt_batch
    from rlx.rollout import sample, sequence_logprobs_and_entropy

    correct, ent, tokens = [], 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = prompt_batch([ex["prompt"] for ex in chunk], tokenizer, model.device)
        r = sample(model, b["input_ids"], b["attention_mask"], max_new_tokens=MAX_NEW, temperature=0.0,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        ids, mask = r.sequences()
        _, entropy = sequence_logprobs_and_entropy(model, ids, mask, r.response_ids.shape[1])
        ent, tokens = ent + entropy.sum().item(), tokens + int(r.response_mask.sum())
        texts = tokenizer.batch_decode(r.response_ids, skip_special_tokens=True)
        correct += [task.score(t, ex) == 1.0 for t, ex in zip(texts, chunk)]
    return correct, ent / max(tokens, 1)


def eval_sets(n: int):
    from rlx.data.reasoning import ReasoningTask

    inside = ReasoningTask(num_train=0, num_validation=n, num_test=0, min_terms=2, max_terms=4, max_digits=1)
    outside = ReasoningTask(num_train=0, num_validation=n, num_test=0, **OOD)
    return {"id": inside, "ood": outside}


def scored(policy, sets: dict) -> dict:
    policy.model.eval()
    out = {}
    for name, task in sets.items():
        correct, entropy = greedy(policy.model, policy.tokenizer, task, task.split("validation"))
        out.update({f"{name}_correct": correct, f"{name}_acc": sum(correct) / len(correct), f"{name}_entropy": entropy})
    return out


# ---------------------------------------------------------------------------- runs


def run(name: str, seed: int, args, sets: dict) -> dict:
    t0 = time.perf_counter()
    if RUNS[name] is None:
        from rlx.models import tiny_sft

        record = {"run": name, "seed": seed, **scored(tiny_sft(device="cpu"), sets)}
    else:
        overrides = [*COMMON, *RUNS[name], f"data.num_train={args.problems}", f"data.num_validation={args.eval}",
                     f"trainer.max_steps={args.steps}", f"seed={seed}"]
        with trained(overrides, quiet=True) as t:
            s = t.summary
            loss_key = "train/sample_loss" if "weight/mean" in s else "train/loss"  # GLOW's train/loss is weighted
            record = {"run": name, "seed": seed, "train_s": s["train/time_s"],
                      "final_loss": metric(s, loss_key), "loss_curve": metric(t.rows, loss_key, steps=True),
                      "weight_curve": metric(t.rows, "weight/mean", steps=True),
                      "weight_min": min(metric(t.rows, "weight/min"), default=None),
                      "weight_max": max(metric(t.rows, "weight/max"), default=None),
                      **scored(t.policy(), sets)}
    record["wall_s"] = time.perf_counter() - t0
    return record


def measure(args) -> dict:
    sets = eval_sets(args.eval)
    budget = {"steps": args.steps, "problems": args.problems, "eval": args.eval}
    earlier = bench.earlier(**budget).get("runs", [])
    have_base = any(r["run"] == "base" for r in earlier)  # the untrained base does not depend on the seed
    items = [(name, seed) for seed in args.seeds for name in args.runs
             if not (RUNS[name] is None and (have_base or seed != args.seeds[0]))]
    t0 = time.perf_counter()
    result = bench.sweep(lambda name, seed: run(name, seed, args, sets), items, ("run", "seed"), earlier, budget,
                         show=("id_acc", "ood_acc", "ood_entropy", "final_loss", "wall_s"))
    result["wall_s"] = time.perf_counter() - t0
    return bench.record(**{k: v for k, v in result.items() if k not in ("command", "date", "machine")})


# ---------------------------------------------------------------------------- report


def pooled(runs: list[dict], name: str, key: str) -> list:
    return [x for r in runs if r["run"] == name for x in r[key]]


def render(result: dict) -> str:
    runs, m = result["runs"], result["machine"]
    seeds = sorted({r["seed"] for r in runs if r["run"] != "base"})
    lines = [bench.heading, "",
             f"`{result['command']}` on {m['cpu']} ({m['cpu_count']} cores), {result['date']}; "
             f"{result['steps']} steps of 16 samples on {result['problems']} chain_sum problems (2-4 one-digit terms), "
             f"seeds {', '.join(map(str, seeds))}; greedy accuracy on {result['eval']} in-domain problems (the training "
             "family) and on as many out-of-domain ones (2-3 terms, up to 2-digit numbers); entropy: the policy's mean "
             "next-token entropy (nats) over its greedy responses. Δ: paired per problem against `positive`, pooled "
             "over seeds, ± its standard error." + (f" Wall time {result['wall_s'] / 60:.1f} min." if "wall_s" in result
                                                     else ""), "",
             "| run | in-domain acc | Δ in-domain | OOD acc | Δ OOD | entropy ID | entropy OOD | final train loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in RUNS:
        rs = [r for r in runs if r["run"] == name]
        if not rs:
            continue
        if RUNS[name] is None:  # the untrained base: one evaluation whatever the seed
            rs = rs[:1]
        cells = []
        for key in ("id", "ood"):
            acc, se = mean_se([r[f"{key}_acc"] for r in rs])
            cells.append(f"{acc:.3f}" + (f" ± {se:.3f}" if len(rs) > 1 else ""))
            base = pooled(runs, "positive", f"{key}_correct")
            mine = pooled(runs, name, f"{key}_correct")
            if name in ("base", "positive") or len(base) != len(mine):
                cells.append("")
            else:
                d, dse = paired_difference(base, mine)
                cells.append(f"{d:+.3f} ± {dse:.3f}")
        ent = [f"{mean_se([r[f'{k}_entropy'] for r in rs])[0]:.4f}" for k in ("id", "ood")]
        loss = f"{mean_se([r['final_loss'] for r in rs])[0]:.4f}" if "final_loss" in rs[0] else ""
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {ent[0]} | {ent[1]} | {loss} |")
    glow = [r for r in runs if r["run"] == "unfiltered_glow"]
    if glow:
        lines += ["", f"GLOW's weights ranged {min(r['weight_min'] for r in glow):.2f}-{max(r['weight_max'] for r in glow):.2f} "
                  "over the logged steps (5-step averages of each step's min and max); final train loss is the "
                  "unweighted per-sample mean for GLOW and the token mean for the others."]
    lines += ["", "Runs: " + "; ".join(f"`{n}`: `{' '.join(o) if o else 'the base, untrained'}`" for n, o in RUNS.items())
              + f"; all trained runs add `{' '.join(COMMON)}`."]
    return "\n".join(lines)


def plot(result: dict) -> None:
    runs = result["runs"]
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in RUNS if any(r["run"] == n for r in runs)]
    for j, key in enumerate(("id", "ood")):
        stats = [mean_se([r[f"{key}_acc"] for r in runs if r["run"] == n]) for n in names]
        ax.bar([i + 0.4 * j for i in range(len(names))], [s[0] for s in stats], 0.4,
               yerr=[0 if s[1] != s[1] else s[1] for s in stats], label="in-domain" if key == "id" else "out-of-domain")
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set(ylabel="greedy accuracy", title="accuracy (mean over seeds)")
    ax.legend(fontsize=8)
    for name in names:
        curves = [r["loss_curve"] for r in runs if r["run"] == name and r.get("loss_curve")]
        if curves:
            bx.plot([s for s, _ in curves[0]], [sum(c[i][1] for c in curves) / len(curves) for i in range(len(curves[0]))],
                    label=name)
    bx.set(xlabel="step", ylabel="train loss (per-sample mean for GLOW)", title="training loss", yscale="log")
    bx.legend(fontsize=8)
    bench.save_figure(fig, "glow.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
