"""Preference learning on the embedded task: a reward model and DPO from the tiny SFT base.

    python scripts/bench_pref.py                # needs the SFT base (built on first use); ~6 min on 2 CPU cores
    python scripts/bench_pref.py --report       # re-render the table from the JSON

On the 256 held-out validation pairs of `data=reasoning_pairs` (a correct, concise trace against
one with an arithmetic slip or a needless re-check), before and after training:
* rm:  `rlx train algo=rm data=reasoning_pairs model=tiny_sft`; pair accuracy = fraction of
       pairs where the reward of the chosen response beats the rejected one's;
* dpo: `rlx train algo=dpo data=reasoning_pairs model=tiny_sft optimizer.lr=1e-5`; pair accuracy
       = fraction where the policy's log-ratio to the SFT base is larger for the chosen response
       (DPO's implicit reward; 0.5 in expectation before training, where every ratio is 0, so the
       row before DPO uses the base model's own log-likelihood preference instead), plus greedy
       answer accuracy on the 256 validation problems, which DPO must not destroy.
Writes docs/results/bench_pref.json and the "Preference learning" section of docs/RESULTS.md.
"""
from __future__ import annotations

import torch

from rlx.benchmark import Bench, machine_line, trained

COMMON = ["data=reasoning_pairs", "model=tiny_sft", "trainer.progress=false", "trainer.warmup_steps=5",
          "trainer.eval_every=0", "trainer.save_every=0", "trainer.eval_samples=0"]
RUNS = {"rm": ["algo=rm", "trainer.max_steps=60", "optimizer.lr=1e-4"],
        "dpo": ["algo=dpo", "trainer.max_steps=60", "optimizer.lr=1e-5"]}
bench = Bench(__doc__, "## Preference learning: reward model and DPO (bench_pref)")


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


def measure(args) -> dict:
    from rlx.config import build, compose_config
    from rlx.evaluate import answers

    cfg = compose_config("train", ["algo=rm", *COMMON])
    base, pairs_task = build(cfg.model), build(cfg.data)
    problems = build(compose_config("train", ["model=tiny_sft"]).data)  # the same problems, as prompts
    pairs = pairs_task.split("validation")
    greedy = lambda m, t: sum(answers(m, t, problems, list(problems.split("validation")), 64, 160)[0]) / 256
    base_rm, base_lik = pair_scores(base.model, base.tokenizer, pairs, "rm"), pair_scores(base.model, base.tokenizer, pairs, "dpo")
    result = {"pairs": len(pairs), "base": {"rm_pair_accuracy": accuracy(base_rm),
                                            "likelihood_pair_accuracy": accuracy(base_lik),
                                            "greedy_accuracy": greedy(base.model, base.tokenizer)}}
    for name, overrides in RUNS.items():
        with trained([*overrides, *COMMON, *(["trainer.max_steps=2"] if args.quick else [])]) as t:
            summary, tuned = t.summary, t.policy()
        scores = pair_scores(tuned.model, tuned.tokenizer, pairs, name)
        row = {"overrides": overrides, "train_time_s": summary["train/time_s"]}
        if name == "rm":
            row["pair_accuracy"] = accuracy(scores)
        else:  # DPO's implicit reward: the log-ratio to the frozen base
            row["pair_accuracy"] = accuracy(scores - base_lik)
            row["likelihood_pair_accuracy"] = accuracy(scores)
            row["greedy_accuracy"] = greedy(tuned.model, tuned.tokenizer)
        result[name] = row
    return bench.record(**result)


def render(r: dict) -> str:
    b, rm, dpo, m = r["base"], r["rm"], r["dpo"], r["machine"]
    cmd = lambda row: "`rlx train " + " ".join([*row["overrides"], "data=reasoning_pairs model=tiny_sft"]) + "`"
    return "\n".join([
        bench.heading, "",
        f"On the {r['pairs']} held-out validation pairs of `data=reasoning_pairs` (a correct, concise trace against one "
        "with an arithmetic slip or a needless re-check), from the tiny SFT base.", "",
        "| run | training | pair accuracy before | pair accuracy after | greedy answer accuracy before -> after |",
        "|---|---|---:|---:|---:|",
        f"| {cmd(rm)} | {rm['train_time_s'] / 60:.1f} min | {b['rm_pair_accuracy']:.1%} (EOS logit) | "
        f"{rm['pair_accuracy']:.1%} | - |",
        f"| {cmd(dpo)} | {dpo['train_time_s'] / 60:.1f} min | {b['likelihood_pair_accuracy']:.1%} (log-likelihood) | "
        f"{dpo['pair_accuracy']:.1%} (implicit reward); {dpo['likelihood_pair_accuracy']:.1%} (log-likelihood) | "
        f"{b['greedy_accuracy']:.1%} -> {dpo['greedy_accuracy']:.1%} |", "",
        "- Before DPO every implicit reward is 0, so the 'before' column gives the base model's own preference: "
        "the pair's summed log-likelihood. A pair-accuracy s.e. is about 3 points at these sizes.",
        f"- Machine: {machine_line(m)}.",
        f"- Command: `{r['command']}` ({r['date']}).", ""])


if __name__ == "__main__":
    bench.main(measure, render)
