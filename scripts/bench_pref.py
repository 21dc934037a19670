"""Preference learning on the embedded task: a reward model and DPO from the tiny SFT base.

    python scripts/bench_pref.py                # needs the SFT base (`make base`); ~6 min on 2 CPU cores

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

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, ROOT, machine, now, write_section  # noqa: E402

from rlx.algorithms.dpo import response_logps  # noqa: E402
from rlx.algorithms.rm import sequence_reward  # noqa: E402
from rlx.config import build, compose_config  # noqa: E402
from rlx.data.collate import lm_batch, pair_rows  # noqa: E402
from rlx.evaluate import answers  # noqa: E402
from rlx.models import hf  # noqa: E402
from rlx.state import find_checkpoint  # noqa: E402
from rlx.tasks import run_training  # noqa: E402

HEADING = "## Preference learning: reward model and DPO (bench_pref)"
COMMON = ["data=reasoning_pairs", "model=tiny_sft", "trainer.progress=false", "trainer.warmup_steps=5",
          "trainer.eval_every=0", "trainer.save_every=0", "trainer.eval_samples=0"]
RUNS = {"rm": ["algo=rm", "trainer.max_steps=60", "optimizer.lr=1e-4"],
        "dpo": ["algo=dpo", "trainer.max_steps=60", "optimizer.lr=1e-5"]}


@torch.no_grad()
def pair_scores(model, tokenizer, pairs: list[dict], kind: str) -> torch.Tensor:
    """[N, 2] (chosen, rejected): the RM's reward, or the summed log-likelihood of the response."""
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


def main() -> None:
    cfg = compose_config("train", ["algo=rm", *COMMON])
    base, pairs_task = build(cfg.model), build(cfg.data)
    problems = build(compose_config("train", ["model=tiny_sft"]).data)  # the same problems, as prompts
    pairs = pairs_task.split("validation")
    greedy = lambda m, t: sum(answers(m, t, problems, list(problems.split("validation")), 64, 160)[0]) / 256
    base_rm, base_lik = pair_scores(base.model, base.tokenizer, pairs, "rm"), pair_scores(base.model, base.tokenizer, pairs, "dpo")
    result = {"date": now(), "machine": machine(), "command": "python scripts/bench_pref.py", "pairs": len(pairs),
              "base": {"rm_pair_accuracy": accuracy(base_rm), "likelihood_pair_accuracy": accuracy(base_lik),
                       "greedy_accuracy": greedy(base.model, base.tokenizer)}}
    for name, overrides in RUNS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            summary = run_training(compose_config("train", [*overrides, *COMMON]), Path(run_dir))
            tuned = hf(str(find_checkpoint(run_dir)), dtype="float32", device="cpu")
        scores = pair_scores(tuned.model, tuned.tokenizer, pairs, name)
        row = {"overrides": overrides, "train_time_s": summary["train/time_s"]}
        if name == "rm":
            row["pair_accuracy"] = accuracy(scores)
        else:  # DPO's implicit reward: the log-ratio to the frozen base
            row["pair_accuracy"] = accuracy(scores - base_lik)
            row["likelihood_pair_accuracy"] = accuracy(scores)
            row["greedy_accuracy"] = greedy(tuned.model, tuned.tokenizer)
        result[name] = row
    (ROOT / "docs" / "results" / "bench_pref.json").write_text(json.dumps(result, indent=2) + "\n")
    section = render(result)
    write_section(RESULTS, HEADING, section)
    print(section)


def render(r: dict) -> str:
    b, rm, dpo, m = r["base"], r["rm"], r["dpo"], r["machine"]
    cmd = lambda row: "`rlx train " + " ".join([*row["overrides"], "data=reasoning_pairs model=tiny_sft"]) + "`"
    return "\n".join([
        HEADING, "",
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
        f"- Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['device']}; torch {m['torch']}.",
        f"- Command: `{r['command']}` ({r['date']}).", ""])


if __name__ == "__main__":
    main()
