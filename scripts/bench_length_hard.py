"""The accuracy-length frontier rerun on the hard reasoning task, where brevity and accuracy conflict.

    make bench-length-hard                                 # every method, 3 seeds, on both cores
    python scripts/bench_length_hard.py --runs grpo dler_da --seeds 0
    python scripts/bench_length_hard.py --probes           # the papers' settings (PROBES), one seed each
    python scripts/bench_length_hard.py --probes grpo_x5   # one of them
    python scripts/bench_length_hard.py --report           # re-render the tables and plots from the JSON

The embedded frontier (bench_length_rl) could not separate the length methods: there shortening only
removes re-checks that never cost an answer. `data=reasoning_hard` mixes easy sums (2-3 terms) with
hard ones (5-7 terms, every step needed) and has a long tail of re-checked responses (its properties:
bench_hard_task). Here a blunt penalty can cut the hard items' needed steps, which is what DLER,
DA-DLER, DRPO and GRPO-lambda claim to avoid, and some responses run several times past the median,
which is what DOT cuts and what T-PPO does not wait for.

Every run starts from `model=tiny_sft_hard` with the same prompts per rollout, group size, learning
rate, number of rollouts and seeds; only the method differs (METHODS). The generation budget is 480
tokens (the longest trace), so the naive penalty's |o| / 480 and DRPO's L_max are on that scale.
DLER truncates at 128 tokens (above a hard item's trace without re-checks, below a re-checked one);
DA-DLER gives groups solved at least half the time 64. After training, the final checkpoint answers
the validation problems (`--problems`, 40% hard) `EVAL_SAMPLES` times each at T = 1 (budget 480,
fixed sampling seed): sampled accuracy overall and per difficulty, mean length per difficulty,
tokens per correct answer and the re-check rate; greedy accuracy per difficulty beside it.

PPO against T-PPO: the same prompts and samples per prompt; T-PPO's windows are 160 tokens (a third
of the cap, the paper's ratio), and it runs 1.5 windows per PPO rollout as in bench_length_rl. Reported:
responses finished per second, the share of time generating, and seconds to the same training reward.

Several processes may run at once (different --runs or --seeds; `make bench-length-hard` runs the
GRPO family in two one-thread processes): they record into the same JSON. PPO against T-PPO is a
wall-clock comparison, so the Makefile runs that pair alone. Runs are kept only while they were
measured on the same build of the base (the SHA-256 of its weights, recorded with each run).

Writes docs/results/bench_length_hard.json, the "Accuracy-length frontier on the hard task" section of
docs/RESULTS.md and the plots docs/length_frontier_hard.png and docs/tppo_wallclock_hard.png.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the embedded frontier's shared pieces
from bench_length_rl import curve, fmt, training_means, wallclock_figure  # noqa: E402
from bench_length_rl import throughput as _throughput  # noqa: E402

from rlx.benchmark import Bench, machine_line, pyplot, trained  # noqa: E402
from rlx.evaluate import mean_se  # noqa: E402

# --fold: from model=tiny_sft_fold (the base that also saw folded traces, so it sometimes skips lines),
# into its own JSON, plots and RESULTS.md section
FOLD = "--fold" in sys.argv
MODEL = "tiny_sft_fold" if FOLD else "tiny_sft_hard"
EVAL_SAMPLES, BUDGET, BASE = 2, 480, MODEL.replace("_", "-")
FRONTIER_PNG = "length_frontier_fold.png" if FOLD else "length_frontier_hard.png"
ANCHOR = "the-folded-base-where-a-shorter-answer-is-a-riskier-one" if FOLD else "the-hard-task-what-the-rerun-shows"
PROMPTS, MINIBATCHES, LR = 8, 2, "1e-4"
COMMON = [f"model={MODEL}", "data=reasoning_hard", f"trainer.micro_batch_size={PROMPTS}", f"optimizer.lr={LR}",
          "trainer.warmup_steps=0", "trainer.lr_scheduler=constant", "trainer.eval_every=0", "trainer.save_every=0",
          "trainer.log_every=1", "trainer.progress=false"]
FAMILY = ["algo.group_size=8", f"algo.minibatches={MINIBATCHES}"]
CAP = [f"algo.max_new_tokens={BUDGET}"]
METHODS = {
    "grpo": ["algo=grpo", *CAP, *FAMILY],
    "naive_lp": ["algo=grpo", *CAP, "reward=length_penalty", "reward.weights.length=0.5", *FAMILY],
    "naive_lp_strong": ["algo=grpo", *CAP, "reward=length_penalty", "reward.weights.length=2.0", *FAMILY],
    # harsher: at 8 a right hard answer (~70 tokens) scores about what a bare guess (~10) does; at 32
    # the guess scores far higher, so only here can dropping a hard answer's needed steps pay
    "naive_lp_harsh": ["algo=grpo", *CAP, "reward=length_penalty", "reward.weights.length=8.0", *FAMILY],
    "naive_lp_extreme": ["algo=grpo", *CAP, "reward=length_penalty", "reward.weights.length=32.0", *FAMILY],
    "dler": ["algo=dler", "algo.max_new_tokens=128", *FAMILY],
    "dler_da": ["algo=dler", "algo.max_new_tokens=128", "algo.difficulty_aware=true", "algo.easy_budget=64", *FAMILY],
    "drpo": ["algo=drpo", *CAP, *FAMILY],
    "grpo_lambda": ["algo=grpo_lambda", *CAP, *FAMILY],
    "dot": ["algo=dot", *CAP, *FAMILY],
    "ppo": ["algo=ppo", *CAP, "algo.samples_per_prompt=8", "algo.epochs=1", f"algo.minibatches={MINIBATCHES}",
            "algo.lam=1.0", "algo.critic_lr=1e-3"],
    "tppo": ["algo=tppo", *CAP, "algo.window=160", "algo.samples_per_prompt=8", "algo.lam=1.0",
             "algo.critic_lr=1e-3"],
}
RL_PAIR = ("ppo", "tppo")
# What the papers' settings imply, tried where the main runs showed no effect (`--probes`, seed 0):
# larger groups for T-PPO against PPO (16 samples per prompt, 10 rollouts), and DOT at the paper's
# group size and alpha (32 samples of 2 prompts: the same 64 responses per rollout; alpha 3).
PROBES = {"ppo_g16": ("ppo", ["algo.samples_per_prompt=16"], 10),
          "tppo_g16": ("tppo", ["algo.samples_per_prompt=16"], 10),
          "dot_g32": ("dot", ["algo.group_size=32", "algo.alpha=3.0", "trainer.micro_batch_size=2"], 20),
          # five times the RL budget: whether a penalty that favours a bare guess over a right hard
          # answer, and GRPO beside it, end up cutting the hard answers' needed steps given time
          "grpo_x5": ("grpo", [], 100),
          "naive_lp_extreme_x5": ("naive_lp_extreme", [], 100)}


def throughput(r: dict) -> dict:
    """bench_length_rl's wall-clock figures, counted at this benchmark's prompts and minibatches."""
    return _throughput(r, PROMPTS, MINIBATCHES)
LEVELS = ("easy", "hard")

bench = Bench(__doc__, "## Accuracy-length frontier on the hard task, folded base (bench_length_fold)" if FOLD else
              "## Accuracy-length frontier on the hard task (bench_length_hard)", runs=METHODS,
              quick={"runs": ["grpo", "tppo"], "seeds": [0], "rollouts": 2, "problems": 16})
bench.option("--fold", action="store_true", help="start from model=tiny_sft_fold instead (its own results)")
bench.option("--seeds", nargs="+", type=int, default=[0, 1, 2])
bench.option("--rollouts", type=int, default=20, help="rollouts per run (same for every method)")
bench.option("--problems", type=int, default=128, help="validation problems evaluated")
bench.option("--probes", nargs="*", choices=list(PROBES), help="run these PROBES (all if none named; seed 0) "
             "instead of the methods")
bench.option("overrides", nargs="*", help="more config overrides for every run (after --)")


@torch.no_grad()
def sampled_eval(model, tokenizer, task, problems: int, seed: int = 1234) -> dict:
    """pass@1 over EVAL_SAMPLES samples per problem at T = 1, overall and per difficulty, the lengths,
    the re-check rate, and greedy accuracy per difficulty."""
    from rlx.data.reasoning import step_lines
    from rlx.evaluate import answers, sampled_answers, sampled_metrics

    examples = list(task.split("validation"))[:problems]
    out = sampled_answers(model, tokenizer, task, examples, EVAL_SAMPLES, BUDGET, seed=seed)
    greedy, _ = answers(model, tokenizer, task, examples, 64, BUDGET)
    texts = [t for group in out["texts"] for t in group]
    result = {**sampled_metrics(out), "recheck_rate": sum("check:" in t for t in texts) / len(texts),
              "greedy_accuracy": sum(greedy) / len(greedy)}
    for level in LEVELS:
        rows = [i for i, ex in enumerate(examples) if ex["difficulty"] == level]
        part = {k: [out[k][i] for i in rows] for k in ("correct", "texts", "lengths")}
        m = sampled_metrics(part)
        shortcuts = [step_lines(t) < examples[i]["num_steps"] for i in rows for t in out["texts"][i]]
        result[level] = {"accuracy": m["accuracy"], "mean_len": m["mean_len"], "p90_len": m["p90_len"],
                         "greedy_accuracy": sum(greedy[i] for i in rows) / len(rows),
                         "shortcut_rate": sum(shortcuts) / len(shortcuts)}
    return result


def run(method: str, seed: int, rollouts: int, problems: int, overrides: list[str], task) -> dict:
    from rlx.base import weights_digest
    from rlx.merge import merge_checkpoints
    from rlx.models import hf
    from rlx.paths import cache_dir

    steps = int(rollouts * 1.5) if method == "tppo" else rollouts * MINIBATCHES
    with trained([*COMMON, *METHODS[method], f"seed={seed}", f"trainer.max_steps={steps}", *overrides]) as t:
        trained_policy = t.policy()
        result = sampled_eval(trained_policy.model, trained_policy.tokenizer, task, problems)
        if method.startswith("dler"):  # DLER's update-selective merge into the base, as the paper's
            merged = merge_checkpoints(cache_dir() / "models" / BASE, t.dir, t.dir / "merged")
            policy = hf(str(merged), dtype="float32", device="cpu")
            result["merged"] = sampled_eval(policy.model, policy.tokenizer, task, problems)
        return {"method": method, "seed": seed, "rollouts": rollouts, "overrides": overrides,
                "base_weights": weights_digest(BASE), "torch_threads": torch.get_num_threads(),
                "steps": t.summary["steps"], "train_time_s": t.summary["train/time_s"],
                "wall_s": t.summary["wall_time_s"], **result, "curve": curve(t.rows),
                "training_means": training_means(t.rows)}


def measure(args) -> dict:
    from rlx.base import weights_digest
    from rlx.config import build, compose_config
    from rlx.models import tiny_sft

    task = build(compose_config("train", ["data=reasoning_hard"]).data)
    if args.probes is not None:
        return probe(task, args.problems, args.probes or list(PROBES))
    policy = tiny_sft(device="cpu", base=BASE)
    budget = {"rollouts": args.rollouts, "problems": args.problems, "overrides": args.overrides}
    base, digest = sampled_eval(policy.model, policy.tokenizer, task, args.problems), weights_digest(BASE)
    # the probes may be recorded by another process meanwhile: each record re-reads them, and
    # probe() re-reads the runs
    return bench.sweep(lambda method, seed: run(method, seed, args.rollouts, args.problems, args.overrides, task),
                       [(method, seed) for seed in args.seeds for method in args.runs], ("method", "seed", "overrides"),
                       [r for r in bench.earlier(**budget).get("runs", []) if r.get("base_weights") == digest],
                       lambda runs: {**budget, "base": base, "base_weights": digest,
                                     "probes": bench.load().get("probes", [])},
                       show=("accuracy", "mean_len", "train_time_s"))


def probe(task, problems: int, names: list[str]) -> dict:
    """Run the PROBES `names` and record them beside the methods' runs (whose command and date stay
    theirs; other processes' runs and probes recorded meanwhile are kept)."""
    from rlx.benchmark import now, upsert

    for name in names:
        method, overrides, rollouts = PROBES[name]
        r = run(method, 0, rollouts, problems, overrides, task)
        print(f"{name}: accuracy {r['accuracy']:.4g}, mean_len {r['mean_len']:.4g}", flush=True)
        with bench.locked():
            done = bench.load()
            probes = upsert(done.get("probes", []), {**r, "probe": name, "probe_date": now()}, "probe")
            result = bench.record(**{**done, "probes": probes})
    return result


KEYS = ("accuracy", "mean_len", "tokens_per_correct", "recheck_rate", "greedy_accuracy", "train_time_s")


def summarise(runs: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    merged = [{**r, **r["merged"], "method": r["method"] + "_merged"} for r in runs if "merged" in r]
    for r in runs + merged:
        by.setdefault(r["method"], []).append(r)
    return {m: {"seeds": len(rs), **{k: mean_se([r[k] for r in rs]) for k in KEYS},
                **{f"{level}_{k}": mean_se([r[level].get(k, math.nan) for r in rs]) for level in LEVELS
                   for k in ("accuracy", "mean_len", "greedy_accuracy", "shortcut_rate")}}
            for m, rs in by.items()}


def seconds_to_reward(r: dict, target: float) -> float:
    """Wall-clock seconds until the training accuracy (moving average of 5 logged steps) first reaches
    `target`; nan if it never does."""
    pts = [p for p in r["curve"] if p["accuracy"] is not None]
    for i, p in enumerate(pts):
        window = pts[max(0, i - 4):i + 1]
        if sum(q["accuracy"] for q in window) / len(window) >= target:
            return p["time_s"]
    return math.nan


def wallclock(runs: list[dict]) -> dict[str, dict]:
    """PPO and T-PPO: throughput, generation share, seconds to the training accuracy both reach (the
    lower of their seed-mean final moving averages) and final sampled accuracy, mean ± s.e. over seeds."""
    pairs = {m: [r for r in runs if r["method"] == m] for m in RL_PAIR}
    if not all(pairs.values()):
        return {}

    def final(r):
        pts = [p["accuracy"] for p in r["curve"] if p["accuracy"] is not None][-5:]
        return sum(pts) / len(pts)

    target = min(sum(final(r) for r in rs) / len(rs) for rs in pairs.values())
    out = {"target": target}
    for method, rs in pairs.items():
        figures = [{**throughput(r), "to_target_s": seconds_to_reward(r, target), "accuracy": r["accuracy"],
                    "hard_accuracy": r["hard"]["accuracy"]} for r in rs]
        out[method] = {"seeds": len(rs), **{k: mean_se([f[k] for f in figures if not math.isnan(f[k])] or [math.nan])
                                            for k in figures[0]}}
    return out


def render(result: dict) -> str:
    base, summary = result["base"], summarise(result["runs"])

    def row(name, seeds, s, minutes):
        cells = [fmt(s["accuracy"], ".1f", 100) + "%", fmt(s["easy_accuracy"], ".1f", 100) + "%",
                 fmt(s["hard_accuracy"], ".1f", 100) + "%", fmt(s["easy_mean_len"], ".0f"),
                 fmt(s["hard_mean_len"], ".0f"), fmt(s["tokens_per_correct"], ".0f"),
                 fmt(s["recheck_rate"], ".0f", 100) + "%", fmt(s["easy_greedy_accuracy"], ".0f", 100) + "%",
                 fmt(s["hard_greedy_accuracy"], ".0f", 100) + "%"]
        if skips:  # the share of answers with fewer step lines than the problem needs
            cells += [fmt(s[f"{lv}_shortcut_rate"], ".0f", 100) + "%" for lv in LEVELS]
        return f"| {name} | {seeds} | " + " | ".join(cells) + f" | {minutes} |"

    skips = any("shortcut_rate" in r["hard"] for r in result["runs"])

    nan = (math.nan, math.nan)
    as_pairs = {**{k: (base[k], math.nan) for k in KEYS if k in base},
                **{f"{lv}_{k}": (base[lv].get(k, math.nan), math.nan) for lv in LEVELS
                   for k in ("accuracy", "mean_len", "greedy_accuracy", "shortcut_rate")}}
    rows = [row("SFT base", "-", {**{k: nan for k in KEYS}, **as_pairs}, "-")]
    for method in [m for name in METHODS for m in (name, name + "_merged") if m in summary]:
        s = summary[method]
        rows.append(row(method, s["seeds"], s, f"{s['train_time_s'][0] / 60:.1f}"))
    lines = [bench.heading, "",
             f"From `model={MODEL}` on `data=reasoning_hard`, {result['rollouts']} rollouts of {PROMPTS} prompts "
             f"x 8 samples per run, {MINIBATCHES} optimizer steps per rollout, lr {LR}, budget {BUDGET} tokens; "
             f"evaluated on {result['problems']} validation problems (40% hard) x {EVAL_SAMPLES} samples at T = 1 and "
             "greedily. Mean ± standard error over seeds. 'len' is the mean sampled length in tokens; 're-checks' "
             "the share of responses that repeat their steps.", "",
             "| method | seeds | sampled acc. | easy acc. | hard acc. | easy len | hard len | tokens / correct | "
             "re-checks | greedy easy | greedy hard | " + ("easy skips | hard skips | " if skips else "") + "train min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if skips else "") + "---:|",
             *rows, ""]
    if skips:
        lines += ["'Skips': the share of sampled answers with fewer step lines than the problem needs (folded "
                        "or skipped steps).", ""]
    pair = wallclock(result["runs"])
    if pair:
        lines += [f"PPO against T-PPO (same prompts and samples per prompt, lam 1, critic lr 1e-3; T-PPO's 160-token "
                  f"windows, 1.5 windows per PPO rollout). 'To reward' is the seconds until the training accuracy "
                  f"(moving average of 5 steps) first reaches {pair['target']:.1%}, the lower of the two final "
                  "values:", "",
                  "| method | seeds | responses | wall-clock s | responses / s | generating | to reward s | "
                  "sampled acc. | hard acc. |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method in RL_PAIR:
            w = pair[method]
            lines.append(f"| {method} | {w['seeds']} | {w['responses'][0]:.0f} | {fmt(w['seconds'], '.0f')} | "
                         f"{fmt(w['responses_per_s'], '.2f')} | {w['generation_share'][0]:.0%} | "
                         f"{fmt(w['to_target_s'], '.0f')} | {fmt(w['accuracy'], '.1f', 100)}% | "
                         f"{fmt(w['hard_accuracy'], '.1f', 100)}% |")
        ratio = pair["ppo"]["seconds"][0] / pair["tppo"]["seconds"][0] * pair["tppo"]["responses"][0] / \
            pair["ppo"]["responses"][0]
        lines += ["", f"T-PPO's throughput is {ratio:.2f}x PPO's in finished responses per second.", ""]
    probes_base = result.get("probes_base")
    lines += render_probes(result.get("probes", []), probes_base if probes_base != base else None)
    m = result["machine"]
    lines += [f"![accuracy against length per difficulty]({FRONTIER_PNG})", "",
              f"What each method achieved on each difficulty: [length_rl.md](length_rl.md#{ANCHOR}).", "",
              f"- Base: `model={MODEL}`, weights `{result.get('base_weights', '?')}` (the first digits of their "
              f"SHA-256; `python -c \"from rlx.base import weights_digest; print(weights_digest('{BASE}'))\"`).",
              f"- Machine: {machine_line(m)}; {threads(result['runs'])}.",
              f"- Command: `make bench-length-hard` (last recorded: `{result['command']}`, {result['date']}).", ""]
    return "\n".join(lines)


def threads(runs: list[dict]) -> str:
    """How many torch threads the methods' runs had, e.g. 'torch threads per run: 1 (grpo, ...), 2 (ppo, tppo)'."""
    by: dict[int, list[str]] = {}
    for r in runs:
        names = by.setdefault(r.get("torch_threads", 0), [])
        names += [r["method"]] if r["method"] not in names else []
    return "torch threads per run: " + ", ".join(f"{n or '?'} ({', '.join(ms)})" for n, ms in sorted(by.items()))


def render_probes(probes: list[dict], base: dict | None) -> list[str]:
    """The PROBES' table: one seed each, `python scripts/bench_length_hard.py --probes`, and the base
    they started from where it is not the one of the table above."""
    if not probes:
        return []
    by = {p["probe"]: p for p in probes}
    lines = ["What the papers' settings imply, tried on one seed each (`python scripts/bench_length_hard.py "
             f"--probes`, {max(p['probe_date'] for p in probes)}): PPO and T-PPO with 16 samples per prompt "
             "(10 rollouts), DOT at the paper's group size 32 and alpha 3 (2 prompts a rollout, the same 64 "
             "responses), and GRPO and the naive penalty at weight 32 with five times the RL budget (100 "
             "rollouts)."]
    if base:
        lines[-1] += (" They started from another build of `tiny_sft_hard` (sampled accuracy easy "
                      f"{base['easy']['accuracy']:.1%}, hard {base['hard']['accuracy']:.1%}; greedy easy "
                      f"{base['easy']['greedy_accuracy']:.1%}, hard {base['hard']['greedy_accuracy']:.1%}; mean length "
                      f"{base['mean_len']:.0f} tokens): compare them with each other, not with the table above.")
    lines += ["",
             "| probe | overrides | rollouts | responses / s | generating | rows cut / rollout | sampled acc. | "
             "easy len | hard acc. | hard len |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in PROBES:
        if name not in by:
            continue
        p, means = by[name], by[name]["training_means"]
        rate = throughput(p) if p["method"] in RL_PAIR else None
        cut = means.get("truncation/actually_truncated")
        speed = f"{rate['responses_per_s']:.2f} | {rate['generation_share']:.0%}" if rate else "- | -"
        shown = f"`{' '.join(p['overrides'])}`" if p["overrides"] else "-"
        lines.append(f"| {name} | {shown} | "
                     f"{p['rollouts']} | {speed} | {'-' if cut is None else f'{cut:.2f}'} | "
                     f"{p['accuracy']:.1%} | {p['easy']['mean_len']:.0f} | {p['hard']['accuracy']:.1%} | "
                     f"{p['hard']['mean_len']:.0f} |")
    if "ppo_g16" in by and "tppo_g16" in by:
        ratio = throughput(by["tppo_g16"])["responses_per_s"] / throughput(by["ppo_g16"])["responses_per_s"]
        lines += ["", f"With 16 samples per prompt T-PPO's throughput is {ratio:.2f}x PPO's."]
    return lines + [""]


def plot(result: dict) -> None:
    summary, base = summarise(result["runs"]), result["base"]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.5))
    for ax, level in zip(axes, LEVELS):
        ax.scatter([base[level]["mean_len"]], [100 * base[level]["accuracy"]], marker="*", s=150, color="black",
                   label="SFT base")
        shown = [m for name in METHODS for m in (name, name + "_merged") if m in summary and m not in RL_PAIR]
        colors = pyplot().get_cmap("tab20").colors  # more methods than the default cycle's ten colours
        for i, method in enumerate(shown):
            (x, xe), (y, ye) = summary[method][f"{level}_mean_len"], summary[method][f"{level}_accuracy"]
            ax.errorbar([x], [100 * y], xerr=[0 if math.isnan(xe) else xe], yerr=[0 if math.isnan(ye) else 100 * ye],
                        fmt="s" if method.endswith("_merged") else "o", capsize=3, label=method,
                        color=colors[(2 * i) % 20 + (2 * i) // 20])
        ax.set(xlabel="mean response length (tokens, sampled at T = 1)", ylabel="sampled accuracy (%)",
               title=f"{level} problems")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    bench.save_figure(fig, FRONTIER_PNG)
    if fig := wallclock_figure(result["runs"], "PPO and T-PPO on the hard task"):
        bench.save_figure(fig, "tppo_wallclock_fold.png" if FOLD else "tppo_wallclock_hard.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
