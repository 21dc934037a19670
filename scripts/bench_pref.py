"""The preference family against DPO: every method from the tiny SFT base, same pairs, same steps.

    python scripts/bench_pref.py                         # all methods, 3 seeds (about an hour on 2 CPU cores)
    python scripts/bench_pref.py --runs dpo rpo --seeds 0
    python scripts/bench_pref.py --report                # re-render the table and plot from the JSON

Every run is `rlx train algo=<method> trainer.max_steps=60 seed=<s>` from `model=tiny_sft` on
`data=reasoning_pairs` (NPO: `data=reasoning_unlearn`, its forget/retain task), with the learning
rate its recipe gives (conf/recipe/dpo_from_sft.yaml, rm_from_sft.yaml). MADPO and SmPO read the
per-pair margins of the reward model trained by the `rm` run of the same seed. After training, on
the 256 held-out validation pairs and the 256 validation problems:
* pair accuracy: the fraction of pairs whose chosen response gets the larger implicit reward, the
  policy's summed log-ratio to the SFT base (for the reward models: the larger reward);
* likelihood displacement: the mean change of the summed log-likelihood of the chosen (and the
  rejected) response from the base, DPO's known failure mode is that the chosen side falls too;
* greedy answer accuracy and mean greedy response length (tokens) on the validation problems;
* NPO and its gradient-ascent baseline: greedy accuracy on the forget and on the retain problems.
Mean ± standard error over seeds. Writes docs/results/bench_pref.json, the "Preference family"
section of docs/RESULTS.md and docs/pref_frontier.png (pair accuracy against task accuracy).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from rlx.benchmark import Bench, machine_line, pyplot, trained
from rlx.evaluate import mean_se

COMMON = ["model=tiny_sft", "trainer.progress=false", "trainer.eval_every=0", "trainer.save_every=0",
          "trainer.eval_samples=0", "trainer.log_every=5"]
RM_RUNS = ("rm", "rm_ties")
NEEDS_RM = ("madpo", "smpo")
UNLEARN = ("npo", "ga")
METHODS = {
    "rm": ["algo=rm"],
    "rm_ties": ["algo=rm", "algo.loss=bt_ties", "data.ties=0.25"],
    "dpo": ["algo=dpo"],
    "rpo": ["algo=rpo"],
    "rpo_mean": ["algo=rpo", "algo.nll_reduction=token_mean", "algo.eta=0.2"],
    "madpo": ["algo=madpo"],
    "smpo": ["algo=smpo"],
    "sparsepo": ["algo=sparsepo", "algo.mask=activation"],
    "sparsepo_learned": ["algo=sparsepo", "algo.mask=learned"],
    "inpo": ["algo=inpo", "algo.round_prompts=32"],  # half its default prompts per round: sampling is its cost
    "npo": ["algo=npo"],
    "ga": ["algo=npo", "algo.loss=ga"],
}
bench = Bench(__doc__, "## Preference family against DPO (bench_pref)", runs=METHODS,
              quick={"runs": ["rm", "dpo", "madpo", "npo"], "seeds": [0], "steps": 2, "problems": 32})
bench.option("--seeds", nargs="+", type=int, default=[0, 1, 2])
bench.option("--steps", type=int, default=60, help="training steps of every run")
bench.option("--problems", type=int, default=256, help="validation pairs and problems evaluated")


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def pair_scores(model, tokenizer, pairs: list[dict], kind: str) -> torch.Tensor:
    """[N, 2] (chosen, rejected): the RM's reward, or the summed log-likelihood of the response."""
    from rlx.algorithms._pairs import response_logps
    from rlx.algorithms.rm import sequence_reward
    from rlx.data.collate import lm_batch, pair_rows

    model.eval()
    out = []
    for i in range(0, len(pairs), 64):
        batch = lm_batch(pair_rows(pairs[i : i + 64]), tokenizer, 256)
        if kind == "rm":
            s = sequence_reward(model, batch["input_ids"], batch["attention_mask"], tokenizer.eos_token_id)
        else:
            s = response_logps(model, batch)[0]
        out.append(torch.stack(s.chunk(2), -1))
    return torch.cat(out)


def accuracy(scores: torch.Tensor) -> float:
    return (scores[:, 0] > scores[:, 1]).float().mean().item()


def greedy(model, tokenizer, task, problems: list[dict]) -> dict:
    from rlx.evaluate import answers

    correct, lengths = answers(model, tokenizer, task, problems, 64, 160)
    return {"greedy_accuracy": sum(correct) / len(correct), "greedy_len": sum(lengths) / len(lengths)}


class Eval:
    """The validation pairs and problems every run is measured on, and the base's scores."""

    def __init__(self, problems: int, unlearning: bool):
        from rlx.config import build, compose_config

        cfg = compose_config("train", ["algo=dpo", *COMMON])
        self.base = build(cfg.model)
        self.pairs = build(cfg.data).split("validation")[:problems]
        self.task = build(compose_config("train", ["model=tiny_sft"]).data)  # the same problems, as prompts
        self.problems = self.task.split("validation")[:problems]
        self.sides = {}
        if unlearning:  # NPO's task: the problems it forgets and those it keeps
            self.unlearn = build(compose_config("train", ["algo=npo", *COMMON]).data)
            self.sides = {side: getattr(self.unlearn, f"{side}_split")("validation")[:problems]
                          for side in ("forget", "retain")}
        self.base_logps = pair_scores(self.base.model, self.base.tokenizer, self.pairs, "logp")

    def policy(self, model, tokenizer, name: str) -> dict:
        if name in RM_RUNS:  # and the spread of the passing (chosen) traces' rewards, which SoliReward's ties compress
            rewards = pair_scores(model, tokenizer, self.pairs, "rm")
            return {"pair_accuracy": accuracy(rewards), "pass_std": rewards[:, 0].std().item()}
        logps = pair_scores(model, tokenizer, self.pairs, "logp")
        shift = (logps - self.base_logps).mean(0)
        out = {"pair_accuracy": accuracy(logps - self.base_logps),  # the implicit reward, against the base
               "chosen_logp_change": shift[0].item(), "rejected_logp_change": shift[1].item(),
               **greedy(model, tokenizer, self.task, self.problems)}
        if name in UNLEARN:
            for side, problems in self.sides.items():
                out[f"{side}_accuracy"] = greedy(model, tokenizer, self.unlearn, problems)["greedy_accuracy"]
        return out

    def base_row(self) -> dict:
        model, tokenizer = self.base.model, self.base.tokenizer
        rewards = pair_scores(model, tokenizer, self.pairs, "rm")
        row = {"rm_pair_accuracy": accuracy(rewards), "rm_pass_std": rewards[:, 0].std().item(),
               "likelihood_pair_accuracy": accuracy(self.base_logps), **greedy(model, tokenizer, self.task, self.problems)}
        for side, problems in self.sides.items():
            row[f"{side}_accuracy"] = greedy(model, tokenizer, self.unlearn, problems)["greedy_accuracy"]
        return row


# ---------------------------------------------------------------------------- runs


class RewardModels:
    """The `rm` run of each seed, kept on disk while the benchmark runs: MADPO and SmPO read it."""

    def __init__(self, steps: int):
        self.steps, self.dir, self.done = steps, Path(tempfile.mkdtemp(prefix="rlx-bench-pref-rm-")), {}

    def __call__(self, seed: int) -> tuple[Path, dict]:
        from rlx.config import compose_config
        from rlx.tasks import run_training

        if seed not in self.done:
            cfg = compose_config("train", [*METHODS["rm"], *COMMON, f"seed={seed}", f"trainer.max_steps={self.steps}"])
            self.done[seed] = (self.dir / f"seed{seed}", run_training(cfg, self.dir / f"seed{seed}"))
        return self.done[seed]


def run(name: str, seed: int, steps: int, evaluate: Eval, reward_models: RewardModels) -> dict:
    from rlx.models import hf
    from rlx.state import find_checkpoint

    if name == "rm":  # the reward model MADPO and SmPO use: trained once per seed
        folder, summary = reward_models(seed)
        policy = hf(str(find_checkpoint(folder)), dtype="float32", device="cpu")
        return {"method": name, "seed": seed, "train_time_s": summary["train/time_s"],
                **evaluate.policy(policy.model, policy.tokenizer, name)}
    extra = [f"algo.reward_model.checkpoint={reward_models(seed)[0]}"] if name in NEEDS_RM else []
    with trained([*METHODS[name], *COMMON, f"seed={seed}", f"trainer.max_steps={steps}", *extra]) as t:
        policy = t.policy()
        return {"method": name, "seed": seed, "train_time_s": t.summary["train/time_s"],
                **evaluate.policy(policy.model, policy.tokenizer, name)}


def measure(args) -> dict:
    evaluate, reward_models = Eval(args.problems, any(m in UNLEARN for m in args.runs)), RewardModels(args.steps)
    budget = {"steps": args.steps, "problems": args.problems}  # runs of another budget are not comparable
    return bench.sweep(lambda name, seed: run(name, seed, args.steps, evaluate, reward_models),
                       [(name, seed) for seed in args.seeds for name in args.runs], ("method", "seed"),
                       bench.earlier(**budget).get("runs", []), {**budget, "base": evaluate.base_row()},
                       order=list(METHODS), show=("pair_accuracy", "greedy_accuracy", "train_time_s"))


# ---------------------------------------------------------------------------- report

KEYS = ("pair_accuracy", "pass_std", "greedy_accuracy", "greedy_len", "chosen_logp_change", "rejected_logp_change",
        "forget_accuracy", "retain_accuracy", "train_time_s")


def summarise(runs: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    return {m: {"seeds": len(rs), **{k: mean_se([r[k] for r in rs]) for k in KEYS if k in rs[0]}}
            for m, rs in by.items()}


def fmt(value: tuple[float, float] | None, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    mean, se = value
    return f"{scale * mean:{spec}}{unit}" + ("" if math.isnan(se) else f" ± {scale * se:{spec}}")


def render(r: dict) -> str:
    b, summary = r["base"], summarise(r["runs"])
    pct = lambda s, k: fmt(s.get(k), ".1f", 100, "%")
    lines = [
        bench.heading, "",
        f"Every method from the tiny SFT base, {r['steps']} steps, on the same {r['problems']} held-out pairs of "
        "`data=reasoning_pairs` (a correct, concise trace against one with a slipped step or needless re-checks) "
        f"and {r['problems']} validation problems; mean ± s.e. over seeds. Pair accuracy: the chosen response has "
        "the larger implicit reward (summed log-ratio to the base; reward models: the larger reward). "
        "Δ log p: the change of the summed log-likelihood of the chosen / rejected response from the base "
        "(likelihood displacement when the chosen side falls).", "",
        "| method | seeds | pair accuracy | greedy accuracy | greedy length | Δ log p chosen | Δ log p rejected | "
        "training |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| SFT base | - | {b['likelihood_pair_accuracy']:.1%} (log-likelihood) | {b['greedy_accuracy']:.1%} | "
        f"{b['greedy_len']:.1f} | - | - | - |"]
    for method in [m for m in METHODS if m in summary and m not in UNLEARN + RM_RUNS]:
        s = summary[method]
        lines.append(f"| `{' '.join(METHODS[method])}` | {s['seeds']} | {pct(s, 'pair_accuracy')} | "
                     f"{pct(s, 'greedy_accuracy')} | {fmt(s.get('greedy_len'))} | {fmt(s.get('chosen_logp_change'))} | "
                     f"{fmt(s.get('rejected_logp_change'))} | {fmt(s.get('train_time_s'), '.0f', unit=' s')} |")
    if any(m in summary for m in RM_RUNS):
        lines += ["", "Reward models (pair accuracy: the chosen response gets the larger reward; pass std: the standard "
                  f"deviation of the rewards of the {r['problems']} chosen, passing traces, which SoliReward's tie pairs "
                  "compress).",
                  "", "| run | seeds | pair accuracy | pass std | training |", "|---|---:|---:|---:|---:|",
                  f"| SFT base (EOS logit) | - | {b['rm_pair_accuracy']:.1%} | {b['rm_pass_std']:.2f} | - |"]
        for method in [m for m in RM_RUNS if m in summary]:
            s = summary[method]
            lines.append(f"| `{' '.join(METHODS[method])}` | {s['seeds']} | {pct(s, 'pair_accuracy')} | "
                         f"{fmt(s.get('pass_std'), '.2f')} | {fmt(s.get('train_time_s'), '.0f', unit=' s')} |")
    if any(m in summary for m in UNLEARN):
        lines += ["", "Unlearning (`data=reasoning_unlearn`: forget the 4-term problems, retain the rest): greedy "
                  "accuracy on each side's validation problems.", "",
                  "| method | seeds | forget accuracy | retain accuracy | all problems | training |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| SFT base | - | {b['forget_accuracy']:.1%} | {b['retain_accuracy']:.1%} | {b['greedy_accuracy']:.1%} "
                  "| - |"]
        for method in [m for m in UNLEARN if m in summary]:
            s = summary[method]
            lines.append(f"| `{' '.join(METHODS[method])}` | {s['seeds']} | {pct(s, 'forget_accuracy')} | "
                         f"{pct(s, 'retain_accuracy')} | {pct(s, 'greedy_accuracy')} | "
                         f"{fmt(s.get('train_time_s'), '.0f', unit=' s')} |")
    lines += ["", "What each paper's claim came to here, method by method: [preference.md](preference.md). "
              "Pair accuracy against task accuracy: [pref_frontier.png](pref_frontier.png).", "",
              f"- Machine: {machine_line(r['machine'])}.",
              f"- Command: `{r['command']}` (last run {r['date']}).", ""]
    return "\n".join(lines)


def plot(result: dict) -> None:
    summary, b = summarise(result["runs"]), result["base"]
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    ax.scatter([100 * b["likelihood_pair_accuracy"]], [100 * b["greedy_accuracy"]], marker="*", s=150, color="black",
               label="SFT base (log-likelihood)")
    for method, s in summary.items():
        if method in RM_RUNS or "greedy_accuracy" not in s:
            continue
        (x, xe), (y, ye) = s["pair_accuracy"], s["greedy_accuracy"]
        ax.errorbar([100 * x], [100 * y], xerr=[0 if math.isnan(xe) else 100 * xe],
                    yerr=[0 if math.isnan(ye) else 100 * ye], fmt="o", capsize=3, label=method)
    ax.set(xlabel="held-out pair accuracy by implicit reward (%)", ylabel="greedy answer accuracy (%)",
           title="Preference methods from the SFT base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bench.save_figure(fig, "pref_frontier.png")


if __name__ == "__main__":
    bench.main(measure, render, plot)
