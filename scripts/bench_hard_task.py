"""The properties data=reasoning_hard was built to have, measured before any length method is trained
on it: per-difficulty accuracy of its SFT base, a long tail of sampled lengths, how much of that
length is removable without error, and the share of an RL step spent generating.

    python scripts/bench_hard_task.py                 # builds model=tiny_sft_hard first if needed (60-90 min)
    python scripts/bench_hard_task.py --fold          # the same of model=tiny_sft_fold (30% folded traces)
    python scripts/bench_hard_task.py --report        # re-render the section from the JSON

Measured on `model=tiny_sft_hard` (the tiny model after SFT on the task, `python -m rlx.base --name
tiny-sft-hard`) and the task's validation split (`--problems` of them, 40% hard):
    training traces   the generator's own: characters of prompt + trace, p50/p90/p99/max, and the
                      share of traces that re-check (1, 2, 3 passes)
    greedy accuracy   per difficulty (easy: 2-3 terms; hard: 5-7 terms, every step needed)
    sampled lengths   `--samples` responses per problem at temperature 1 (the RL sampler): tokens,
                      p50/p90/p99/max and max/median, per difficulty; accuracy of the samples
    removable         the share of sampled tokens in re-check lines ("check: ..."), and the accuracy of
                      the samples with those lines cut out (equal: the answer needs none of them)
    shortcuts         the share of samples with fewer step lines than the problem needs, and how
                      often those are right: the short answers a length reward could reinforce
    generation share  `--rl-steps` GRPO steps (group 8, 4 prompts, 480 new tokens) from the base: the
                      sampler's seconds (rl/rollout_s) over the step's (time/batch_s + time/update_s)
Writes docs/results/bench_hard_task.json and the "The hard reasoning task" section of docs/RESULTS.md.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from rlx.benchmark import Bench, machine_line, metric, trained
from rlx.data.reasoning import step_lines

MAX_NEW = 480  # the longest traces (7 terms, 3 re-check passes) are under 480 tokens
# --fold: the base that also saw folded traces (two steps a line), with its own JSON and RESULTS.md section
FOLD = "--fold" in sys.argv
MODEL, DATA = ("tiny_sft_fold", ["data=reasoning_hard", "data.fold_prob=0.3"]) if FOLD else \
    ("tiny_sft_hard", ["data=reasoning_hard"])
BASE = MODEL.replace("_", "-")
bench = Bench(__doc__, "## The hard reasoning task, folded base (bench_hard_task_fold)" if FOLD else
              "## The hard reasoning task (bench_hard_task)",
              quick={"problems": 16, "samples": 2, "rl_steps": 1})
bench.option("--problems", type=int, default=128, help="validation problems measured")
bench.option("--samples", type=int, default=8, help="sampled responses per problem")
bench.option("--fold", action="store_true", help="measure model=tiny_sft_fold (folded traces) instead")
bench.option("--rl-steps", dest="rl_steps", type=int, default=4, help="GRPO steps timed for the generation share")


def quantiles(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float32)
    q = t.quantile(torch.tensor([0.5, 0.9, 0.99])).tolist()
    return {"p50": q[0], "p90": q[1], "p99": q[2], "max": t.max().item(), "max_over_median": t.max().item() / q[0]}


def without_checks(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not line.strip().startswith("check:"))


def measure(args) -> dict:
    from rlx.base import weights_digest
    from rlx.config import build, compose_config
    from rlx.evaluate import answers, sampled_answers
    from rlx.models import tiny_sft

    task = build(compose_config("train", DATA).data)
    train = task.split("train")
    trace_len = [len(ex["prompt"]) + len(ex["completion"]) for ex in train]
    passes = [ex["completion"].count("check: ") // step_lines(ex["completion"]) for ex in train]
    out = {"problems": args.problems, "samples": args.samples, "rl_steps": args.rl_steps,
           "traces": {**quantiles(trace_len), **{f"recheck_{k}": sum(p >= k for p in passes) / len(passes)
                                                  for k in (1, 2, 3)}}}
    policy = tiny_sft(device="cpu", base=BASE)
    out["base_weights"] = weights_digest(BASE)
    model, tok = policy.model.eval(), policy.tokenizer
    val = task.split("validation")[:args.problems]
    t0 = time.perf_counter()
    correct, _ = answers(model, tok, task, val, 64, MAX_NEW)
    sampled = sampled_answers(model, tok, task, val, args.samples, MAX_NEW)
    out["eval_s"] = time.perf_counter() - t0
    for level in ("easy", "hard", "all"):
        rows = [i for i, ex in enumerate(val) if level == "all" or ex["difficulty"] == level]
        lengths = [n for i in rows for n in sampled["lengths"][i]]
        texts = [(t, val[i]) for i in rows for t in sampled["texts"][i]]
        check_chars = sum(len(t) - len(without_checks(t)) for t, _ in texts)
        out[level] = {"problems": len(rows), "greedy_accuracy": sum(correct[i] for i in rows) / len(rows),
                      "sampled_accuracy": sum(c for i in rows for c in sampled["correct"][i]) / len(lengths),
                      "lengths": quantiles(lengths),
                      "removable_share": check_chars / max(sum(len(t) for t, _ in texts), 1),
                      "accuracy_without_checks": sum(task.score(without_checks(t), ex) for t, ex in texts) / len(texts)}
        shortcuts = [task.score(t, ex) for t, ex in texts if step_lines(t) < ex["num_steps"]]
        out[level] |= {"shortcut_share": len(shortcuts) / len(texts),
                       "shortcut_accuracy": sum(shortcuts) / len(shortcuts) if shortcuts else None}
    with trained(["algo=grpo", f"model={MODEL}", *DATA, "model.device=cpu",
                  f"algo.max_new_tokens={MAX_NEW}", "trainer.micro_batch_size=4", f"trainer.max_steps={args.rl_steps}",
                  "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0", "trainer.eval_samples=0",
                  "trainer.progress=false"], quiet=True) as t:
        rollout = sum(metric(t.rows, "rl/rollout_s"))
        step = sum(metric(t.rows, "time/batch_s")) + sum(metric(t.rows, "time/update_s"))
        out["rl"] = {"rollout_s": rollout, "step_s": step, "generation_share": rollout / step,
                     "response_len": statistics.mean(metric(t.rows, "rl/response_len")),
                     "response_len_max": max(metric(t.rows, "rl/response_len_max"))}
    return bench.record(**out)


def shortcut(r: dict) -> str:
    """'0.0%', or '3.1% (40% right)': samples that skip a needed step, and how many of them are right."""
    if "shortcut_share" not in r:
        return "-"
    right = r["shortcut_accuracy"]
    return f"{100 * r['shortcut_share']:.1f}%" + ("" if right is None else f" ({100 * right:.0f}% right)")


def render(result: dict) -> str:
    tr, rl = result["traces"], result["rl"]
    lines = [bench.heading, "",
             f"`{result['command']}`, {result['date']}, {machine_line(result['machine'], threads=True)}. "
             f"`{' '.join(DATA)}` (40% hard problems) and its SFT base `model={MODEL}` (weights "
             f"`{result.get('base_weights', '?')}`, the first digits of their SHA-256); {result['problems']} validation problems, "
             f"{result['samples']} samples each at temperature 1, greedy and sampled answers up to {MAX_NEW} tokens.", "",
             f"Training traces (characters of prompt + trace): median {tr['p50']:.0f}, p90 {tr['p90']:.0f}, "
             f"p99 {tr['p99']:.0f}, max {tr['max']:.0f} ({tr['max_over_median']:.1f}x the median); "
             f"{100 * tr['recheck_1']:.0f}% re-check, {100 * tr['recheck_2']:.0f}% twice, "
             f"{100 * tr['recheck_3']:.0f}% three times.", "",
             "| problems | n | greedy acc | sampled acc | sampled tokens p50 / p90 / p99 / max | max / median "
             "| removable (re-check) share | sampled acc without re-checks | shortcuts (right) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in ("easy", "hard", "all"):
        r = result[level]
        q = r["lengths"]
        lines.append(f"| {level} | {r['problems']} | {100 * r['greedy_accuracy']:.1f}% | "
                     f"{100 * r['sampled_accuracy']:.1f}% | {q['p50']:.0f} / {q['p90']:.0f} / {q['p99']:.0f} / "
                     f"{q['max']:.0f} | {q['max_over_median']:.1f}x | {100 * r['removable_share']:.1f}% | "
                     f"{100 * r['accuracy_without_checks']:.1f}% | {shortcut(r)} |")
    lines += ["", f"Generation share of an RL step: {result['rl_steps']} GRPO steps (group 8, 4 prompts, "
              f"{MAX_NEW} new tokens) spent {rl['rollout_s']:.1f} s of {rl['step_s']:.1f} s sampling: "
              f"**{100 * rl['generation_share']:.0f}%** (mean response {rl['response_len']:.0f} tokens, "
              f"longest {rl['response_len_max']:.0f})."]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.main(measure, render)
