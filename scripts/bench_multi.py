"""Multi-objective, constrained and relative-feedback RL on the embedded task, four parts, from the
tiny SFT base, same budget per run, several seeds.

    python scripts/bench_multi.py                        # every part, 3 seeds (hours on 2 CPU cores)
    python scripts/bench_multi.py --runs raco_05 lw_05 --seeds 0
    python scripts/bench_multi.py --report               # re-render the tables and plots from the JSON

(a) front: RACO (`algo=raco`, c 0.4, clipped) against linear scalarisation (DPO-LW, the same with
    `algo.use_cagrad=false`) at preference vectors w = (w_correct, w_short) in WEIGHTS, on pairs
    where correctness and brevity conflict (`careful` pairs). Objectives after training: sampled
    accuracy and length on the validation problems (greedy answers never re-check). The paper's claim:
    RACO's points lie on or beyond linear scalarisation's front.
(b) over-optimisation: a proxy reward model trained on pairs that prefer the re-checked trace
    (`data.verbose_bias=1`, so it over-rewards verbosity) is the only reward of GRPO (`rm_only`), of
    `algo=constrained` with the proxy held at the value where `rm_only`'s true accuracy peaked (the
    paper's proxy point), and of GRPO with Ctrl-U's weighting over two such reward models
    (`ctrl_u`). Curves: the proxy reward against the checker's accuracy of the sampled responses, over
    training. The claim: the constrained and uncertainty-weighted runs lose less true accuracy.
(c) P3O against PPO on the KL-reward frontier: each at KL weights beta in BETAS, with
    the checker's reward alone and with a per-prompt shift added (`PromptShift`, scale 1), which
    changes no preference. Measured after training: greedy accuracy, and KL(pi || pi_ref) as the mean
    sequence log-ratio of 256 sampled responses. The claims: P3O's frontier is on or above PPO's,
    and the shift leaves P3O's unchanged while PPO's degrades.
(d) heterogeneous scales: correctness, format and a length penalty whose units are ten times too
    large, summed as they are against `reward=multi` (Quark's frozen normalisation and adaptive
    weights, a provisional reconstruction). The property: on one scale, no term dominates by its units.
Mean ± standard error over seeds. Writes docs/results/bench_multi.json, the "Multi-objective RL"
section of docs/RESULTS.md and docs/multi_front.png, docs/overoptimisation.png, docs/p3o_frontier.png.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from rlx.benchmark import Bench, machine_line, pyplot, trained
from rlx.evaluate import mean_se

COMMON = ["model=tiny_sft", "trainer.progress=false", "trainer.save_every=0", "trainer.log_every=1",
          "trainer.eval_every=0", "trainer.eval_samples=256"]
# Each part's budget, the same for every run of the part: (a) 40 DPO-style steps of 32 pairs at lr 1e-4
# (at the DPO recipe's 1e-5 no weighting moved the sampled length by more than 2.5 tokens); (b) 30 GRPO
# steps of 16 prompts x 8 at lr 1e-4, enough to over-optimise the proxy;
# (c) 40 steps of 16 prompts at the RL recipe's lr 3e-5.
PART = {"a": ["trainer.max_steps=40", "optimizer.lr=1e-4"],
        "b": ["trainer.max_steps=30", "optimizer.lr=1e-4", "trainer.micro_batch_size=16"],
        "c": ["trainer.max_steps=40", "trainer.micro_batch_size=16"]}
WEIGHTS = (0.8, 0.5, 0.2)
BETAS = (0.01, 0.1)
SHIFT = ["+reward.terms.shift={_target_: rlx.rewards.PromptShift, scale: 1.0}", "+reward.weights.shift=1.0"]
PROXY_RM = ["algo=rm", "data.verbose_bias=1.0"]

RUNS: dict[str, list[str]] = {}
for w in WEIGHTS:
    tag = f"{int(w * 10):02d}"
    RUNS[f"raco_{tag}"] = ["algo=raco", f"algo.weights=[{w},{1 - w:.1f}]", *PART["a"]]
    RUNS[f"lw_{tag}"] = ["algo=raco", f"algo.weights=[{w},{1 - w:.1f}]", "algo.use_cagrad=false", *PART["a"]]
RUNS["rm_only"] = ["algo=grpo", "reward=rm", *PART["b"]]
RUNS["constrained"] = ["algo=constrained", "reward=rm", "~algo.thresholds.correct", *PART["b"]]
RUNS["ctrl_u"] = ["algo=grpo", "reward=rm_uncertain", *PART["b"]]
for b in BETAS:
    for shifted in (False, True):
        suffix = f"{b}{'_shift' if shifted else ''}"
        RUNS[f"p3o_{suffix}"] = ["algo=p3o", f"algo.beta={b}", *PART["c"], *(SHIFT if shifted else [])]
        RUNS[f"ppo_{suffix}"] = ["algo=ppo", f"algo.kl_reward_coef={b}", "algo.reference=${model}", *PART["c"],
                                 *(SHIFT if shifted else [])]

# (d) rewards on different scales: correctness, format and a length penalty in units ten times too
# large (max_len 6.4 for a budget of 64), summed as they are or put on one scale by reward=multi
LENGTH = "+reward.terms.length={_target_: rlx.rewards.LengthPenalty, max_len: 64}"
# at part (b)'s budget: at (c)'s lr 3e-5 not even the dominated sum moved the greedy length
RUNS["sum_x1"] = ["algo=grpo", "reward=correct_format", LENGTH, "+reward.weights.length=1.0", *PART["b"]]
RUNS["sum_x10"] = ["algo=grpo", "reward=correct_format", LENGTH, "+reward.weights.length=10.0", *PART["b"]]
RUNS["multi_x10"] = ["algo=grpo", "reward=multi", "reward.terms.length.max_len=6.4", *PART["b"]]
SCALES = ("sum_x1", "sum_x10", "multi_x10")

bench = Bench(__doc__, "## Multi-objective RL (bench_multi)", runs=RUNS,
              quick={"runs": ["raco_05", "lw_05", "rm_only", "constrained", "ctrl_u", "p3o_0.1_shift", "ppo_0.1_shift",
                              "multi_x10"],
                     "seeds": [0], "steps": 2, "problems": 16})
bench.option("--seeds", nargs="+", type=int, default=[0, 1, 2])
bench.option("--steps", type=int, default=0, help="training steps of every run (0: its part's budget)")
bench.option("--problems", type=int, default=256, help="validation prompts for the KL estimate")


@torch.no_grad()
def sequence_kl(policy, reference, task, n: int) -> float:
    """KL(pi || pi_ref) estimated as the mean summed log-ratio of one sampled response per prompt."""
    from rlx.data.collate import prompt_batch
    from rlx.rollout import sample, sequence_logprobs

    prompts = [ex["prompt"] for ex in task.split("validation")[:n]]
    tok, model = policy.tokenizer, policy.model
    batch = prompt_batch(prompts, tok, model.device)
    rollout = sample(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=64,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    ids, mask = rollout.sequences()
    width = rollout.response_mask.shape[1]
    log_ratio = sequence_logprobs(model, ids, mask, width) - sequence_logprobs(reference.model, ids, mask, width)
    return float((log_ratio * rollout.response_mask).sum(-1).mean())


@torch.no_grad()
def sampled(policy, problems: int) -> dict:
    """Sampled accuracy and mean length: 2 samples per validation problem at T = 1 (budget 128)."""
    from rlx.evaluate import sampled_answers, sampled_metrics

    task = reasoning_task()
    m = sampled_metrics(sampled_answers(policy.model, policy.tokenizer, task, task.split("validation")[:problems], 2, 128))
    return {"sampled_accuracy": m["accuracy"], "sampled_length": m["mean_len"]}


@functools.cache
def reasoning_task():
    """The embedded reasoning task, built once."""
    from rlx.config import build, compose_config

    return build(compose_config("train", ["model=tiny_sft"]).data)


class ProxyModels:
    """The proxy reward models of each seed (two: Ctrl-U's ensemble), trained on first use and kept
    (in temporary folders) for the runs of that seed."""

    def __init__(self, steps: int):
        self.steps, self.dirs = steps, {}

    def get(self, seed: int) -> list[str]:
        from rlx.config import compose_config
        from rlx.tasks import run_training

        if seed not in self.dirs:
            steps = [f"trainer.max_steps={self.steps}"] if self.steps else []
            self.dirs[seed] = [tempfile.mkdtemp(prefix="bench_multi_rm_") for _ in range(2)]
            for member, folder in zip((seed, seed + 100), self.dirs[seed]):
                run_training(compose_config("train", [*COMMON, *PROXY_RM, f"seed={member}", *steps]), Path(folder))
        return self.dirs[seed]


def proxy_point(rows: list[dict]) -> float:
    """The proxy reward at the step where the sampled responses' accuracy peaked (3-row smoothing)."""
    logged = [r for r in rows if "rl/accuracy" in r and "reward/rm" in r]
    acc = [sum(x["rl/accuracy"] for x in logged[max(0, i - 1): i + 2]) / len(logged[max(0, i - 1): i + 2])
           for i in range(len(logged))]
    return logged[max(range(len(acc)), key=acc.__getitem__)]["reward/rm"]


def run(name: str, seed: int, steps: int, problems: int, proxies: ProxyModels, points: dict) -> dict:
    over = [*COMMON, *RUNS[name], f"seed={seed}", *([f"trainer.max_steps={steps}"] if steps else [])]
    if name in ("rm_only", "constrained"):
        over.append(f"reward.terms.rm.checkpoint={proxies.get(seed)[0]}")
    if name == "constrained":
        over.append(f"+algo.thresholds.rm={points[seed]:.4f}")
    if name == "ctrl_u":
        over.append(f"reward.terms.rm.checkpoints=[{','.join(proxies.get(seed))}]")
    with trained(over, quiet=True) as t:
        s = t.summary
        out = {"name": name, "seed": seed, "accuracy": s.get("eval/accuracy"), "length": s.get("eval/response_len")}
        if name.startswith(("raco", "lw", "sum", "multi")):  # greedy answers never re-check: samples show it
            out.update(sampled(t.policy(), problems))
        if name == "rm_only":
            points[seed] = proxy_point(t.rows)
            out["proxy_point"] = points[seed]
        if name in ("rm_only", "constrained", "ctrl_u"):
            out["curve"] = [(r["step"], r["reward/rm"], r["rl/accuracy"]) for r in t.rows
                            if "reward/rm" in r and "rl/accuracy" in r]
        if name == "multi_x10":
            last_rollout = [r for r in t.rows if "reward/weight_correct" in r][-1]
            out["weights"] = {k[len("reward/weight_"):]: v for k, v in last_rollout.items() if k.startswith("reward/weight_")}
        if name.startswith(("p3o", "ppo")):
            from rlx.config import build, compose_config

            reference = build(compose_config("train", ["model=tiny_sft", "model.device=cpu"]).model)
            out["kl"] = sequence_kl(t.policy(), reference, reasoning_task(), problems)
        return out


def measure(args) -> dict:
    proxies = ProxyModels(args.steps)
    earlier = bench.earlier(steps=args.steps).get("runs", [])
    points = {r["seed"]: r["proxy_point"] for r in earlier if r["name"] == "rm_only"}  # a resumed sweep's
    order = sorted(args.runs, key=lambda n: n != "rm_only")  # the proxy point comes from rm_only
    items = [(name, seed) for seed in args.seeds for name in order]
    return bench.sweep(lambda name, seed: run(name, seed, args.steps, args.problems, proxies, points), items,
                       ("name", "seed"), earlier,
                       {"steps": args.steps, "base": base_point(args.problems)}, show=("accuracy", "length"))


def base_point(problems: int) -> dict:
    """The SFT base's greedy and sampled accuracy and length, where every run starts."""
    from rlx.evaluate import answers
    from rlx.models import tiny_sft

    policy = tiny_sft(device="cpu")
    greedy, lengths = answers(policy.model, policy.tokenizer, reasoning_task(),
                              reasoning_task().split("validation")[:256], 64, 64)
    return {"accuracy": sum(greedy) / len(greedy), "length": sum(lengths) / len(lengths), **sampled(policy, problems)}


def summary(runs: list[dict], name: str, key: str):
    values = [r[key] for r in runs if r["name"] == name and r.get(key) is not None]
    return mean_se(values) if values else None


def fmt(v, spec=".1f", scale=1.0) -> str:
    if v is None:
        return "-"
    m, se = v
    return f"{m * scale:{spec}}" + (f" ± {se * scale:{spec}}" if se == se else "")


def last(runs: list[dict], name: str, column: int, points: int = 3):
    """Mean ± s.e. over seeds of a curve column (1: proxy reward, 2: training accuracy) averaged over
    the last `points` logged steps."""
    values = [sum(c[column] for c in r["curve"][-points:]) / len(r["curve"][-points:])
              for r in runs if r["name"] == name and r.get("curve")]
    return mean_se(values) if values else None


def pct(v) -> str:
    return fmt(v, scale=100) + ("%" if v else "")


def render(result: dict) -> str:
    runs, base = result["runs"], result.get("base", {})
    lines = [bench.heading, "",
             "From the tiny SFT base; mean ± s.e. over seeds (the column says how many). Budgets: (a) 40 steps of 32 "
             "pairs at lr 1e-4; (b) 30 GRPO steps of 16 prompts x 8 at lr 1e-4; (c) 40 steps of 16 prompts at lr 3e-5.",
             "", "(a) Correctness against brevity on pairs where they conflict (`careful`: a long right trace over a "
             "short wrong one). Sampled accuracy and length: 2 samples per validation problem at T = 1, budget 128; "
             "greedy accuracy beside them.", "",
             "| w (correct, short) | seeds | RACO sampled acc. | RACO length | RACO greedy | DPO-LW sampled acc. | "
             "DPO-LW length | DPO-LW greedy |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        lines.append(f"| SFT base | - | {base['sampled_accuracy']:.1%} | {base['sampled_length']:.1f} | "
                     f"{base['accuracy']:.1%} | | | |")
    for w in WEIGHTS:
        r, lw = f"raco_{int(w * 10):02d}", f"lw_{int(w * 10):02d}"
        seeds = len([x for x in runs if x["name"] == r])
        lines.append(f"| ({w}, {1 - w:.1f}) | {seeds} | {pct(summary(runs, r, 'sampled_accuracy'))} | "
                     f"{fmt(summary(runs, r, 'sampled_length'))} | {pct(summary(runs, r, 'accuracy'))} | "
                     f"{pct(summary(runs, lw, 'sampled_accuracy'))} | {fmt(summary(runs, lw, 'sampled_length'))} | "
                     f"{pct(summary(runs, lw, 'accuracy'))} |")
    lines += ["", "(b) GRPO on a proxy reward model that over-rewards verbosity (trained on pairs that prefer the "
              "re-checked trace). The proxy reward and the checker's accuracy of the sampled training responses "
              "(mean of the last 3 steps), and the final greedy accuracy and length (budget 64). `constrained` holds "
              "the proxy at the value where `rm_only`'s training accuracy peaked (per seed: "
              + ", ".join(f"{r['proxy_point']:.2f}" for r in runs if r["name"] == "rm_only") + ").", "",
              "| run | seeds | proxy reward | training acc. | greedy acc. | greedy length |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("rm_only", "constrained", "ctrl_u"):
        seeds = len([x for x in runs if x["name"] == name])
        lines.append(f"| `{name}` | {seeds} | {fmt(last(runs, name, 1), '.2f')} | {pct(last(runs, name, 2))} | "
                     f"{pct(summary(runs, name, 'accuracy'))} | {fmt(summary(runs, name, 'length'))} |")
    lines += ["", "(c) P3O and PPO at KL weights beta: greedy accuracy and KL(pi || pi_ref) (the mean sequence "
              "log-ratio of one sampled response per validation problem), with the checker's reward and with a "
              "per-prompt shift added to it (`PromptShift`, scale 1: no preference changes).", "",
              "| beta | P3O acc. | P3O KL | PPO acc. | PPO KL | P3O acc. (shift) | P3O KL (shift) | PPO acc. (shift) | "
              "PPO KL (shift) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in BETAS:
        cells = [f"{pct(summary(runs, f'{a}_{b}{sh}', 'accuracy'))} | {fmt(summary(runs, f'{a}_{b}{sh}', 'kl'), '.2f')}"
                 for sh in ("", "_shift") for a in ("p3o", "ppo")]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    if any(r["name"] in SCALES for r in runs):
        lines += ["", "(d) GRPO on correctness + 0.1 format + a length penalty, the last in units ten times too large "
                  "(-10 |o| / 64): summed as they are (`sum_x10`; `sum_x1` is the same sum in the right units) and "
                  "with `reward=multi` (each term z-scored on the first rollout's statistics, weights adapted every 10 "
                  "rollouts); budget (b). Sampled accuracy and length (2 samples per validation problem at T = 1), "
                  "greedy beside them.", "",
                  "| run | seeds | sampled acc. | sampled length | greedy acc. | greedy length |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in SCALES:
            seeds = len([x for x in runs if x["name"] == name])
            lines.append(f"| `{name}` | {seeds} | {pct(summary(runs, name, 'sampled_accuracy'))} | "
                         f"{fmt(summary(runs, name, 'sampled_length'))} | {pct(summary(runs, name, 'accuracy'))} | "
                         f"{fmt(summary(runs, name, 'length'))} |")
    lines += ["", "![RACO's front](multi_front.png) ![over-optimisation](overoptimisation.png) "
              "![P3O's frontier](p3o_frontier.png)", "",
              "Whether each paper's claim showed: [multi_objective.md](multi_objective.md#what-the-benchmark-shows).",
              "", f"- Machine: {machine_line(result['machine'], threads=True)}.",
              f"- Command: `{result['command']}` (last run {result['date']}).", ""]
    return "\n".join(lines)


def plot(result: dict) -> None:
    runs, base = result["runs"], result.get("base", {})
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    if base:
        ax.scatter([base["sampled_length"]], [100 * base["sampled_accuracy"]], marker="*", s=150, color="black",
                   label="SFT base")
    for prefix, label in (("raco", "RACO"), ("lw", "DPO-LW (linear)")):
        pts = [(summary(runs, f"{prefix}_{int(w * 10):02d}", "sampled_length"),
                summary(runs, f"{prefix}_{int(w * 10):02d}", "sampled_accuracy"), w) for w in WEIGHTS]
        pts = [(x[0], 100 * y[0], w) for x, y, w in pts if x and y]
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            for x, y, w in pts:
                ax.annotate(f"w={w}", (x, y), fontsize=7, color=line.get_color(), xytext=(3, 3),
                            textcoords="offset points")
    ax.set(xlabel="sampled length (tokens)", ylabel="sampled accuracy (%)", title="Correctness against brevity")
    bench.save_figure(fig, "multi_front.png", ax)

    # Over-optimisation: the proxy climbs while the checker's accuracy falls, per step (seed mean,
    # moving average of 5 steps: one rollout of 128 samples is noisy)
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for name in ("rm_only", "constrained", "ctrl_u"):
        curves = [r["curve"] for r in runs if r["name"] == name and r.get("curve")]
        if curves:
            n = min(len(c) for c in curves)
            for ax, column, scale in ((left, 1, 1), (right, 2, 100)):
                mean = [scale * sum(c[i][column] for c in curves) / len(curves) for i in range(n)]
                smooth = [sum(mean[max(0, i - 4):i + 1]) / len(mean[max(0, i - 4):i + 1]) for i in range(n)]
                ax.plot([c[0] for c in curves[0][:n]], smooth, label=f"{name} ({len(curves)} seeds)")
    left.set(xlabel="step", ylabel="proxy reward (mean over the rollout)", title="What the policy optimises")
    right.set(xlabel="step", ylabel="checker accuracy of the samples (%)", title="What it was meant to improve")
    left.grid(alpha=0.3)
    bench.save_figure(fig, "overoptimisation.png", right)

    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    for a, colour in (("p3o", "C0"), ("ppo", "C1")):
        for sh, marker in (("", "o-"), ("_shift", "s--")):
            pts = [(summary(runs, f"{a}_{b}{sh}", "kl"), summary(runs, f"{a}_{b}{sh}", "accuracy")) for b in BETAS]
            pts = [(x, y) for x, y in pts if x and y]
            if pts:  # P3O's shifted points lie exactly on its unshifted ones
                ax.errorbar([x[0] for x, _ in pts], [100 * y[0] for _, y in pts], xerr=[x[1] for x, _ in pts],
                            yerr=[100 * y[1] for _, y in pts], fmt=marker, color=colour, capsize=3, alpha=0.8,
                            label=a.upper() + (" (shifted reward)" if sh else "") + f", beta {BETAS}")
    ax.set(xlabel="KL(pi || pi_ref) (nats per response)", ylabel="greedy accuracy (%)", title="KL-reward frontier")
    bench.save_figure(fig, "p3o_frontier.png", ax)


if __name__ == "__main__":
    bench.main(measure, render, plot)
