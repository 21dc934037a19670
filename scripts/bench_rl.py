"""RL speed against TRL: seconds per optimizer step of TRL's GRPOTrainer / DPOTrainer and rlx's
GRPO / DPO on the same work, in one process (about 4 minutes on 2 quiet CPU cores).

    python scripts/bench_rl.py                  # GRPO 4x8 and 16x8, DPO 16; 10 steps x 3 runs each side
    python scripts/bench_rl.py --quick          # 3 steps, 1 run each: a smoke test (outputs/bench-quick/)
    python scripts/bench_rl.py --report         # only rewrite the RESULTS.md section from the JSON

Needs the tiny SFT base (built on first use) and TRL (`make install` puts it in the dev extras).

The same work on both sides:
* model   the tiny SFT base, loaded from its HF folder (TRL) or as `model=tiny_sft` (rlx), fp32, CPU;
* GRPO    the reasoning task's train prompts, in the order rlx's ExampleStream draws them (TRL gets
          them as an in-memory Dataset with its shuffling off), `--prompts` prompts per step x
          `--group-size` samples, up to `--max-new-tokens` tokens, T=1, top_p=1, no top-k, reward =
          rlx's exact-answer checker (`rlx.rewards.Correctness`), group-scaled advantages,
          token-mean loss (TRL "dapo", rlx "token_mean"), no KL, one update per rollout, no vLLM;
* DPO     `--dpo-pairs` pairs per step from `data=reasoning_pairs` in stream order (TRL's sampler
          sequential), sigmoid loss, beta 0.1, a frozen reference forward on every new pair;
* both    AdamW (betas 0.9/0.95, no weight decay) at a constant `--lr`, grad-norm clip 1.0, no
          gradient checkpointing, no bf16, no eval, saving or logging inside the timed steps.

Timing: the first step of each run is a warm-up and is left out; s/step is the mean of steps
2..N. TRL's steps are timed with a TrainerCallback (on_step_end timestamps); rlx's from its
per-step `time/batch_s + time/update_s` (log_every=1). Generated tokens (GRPO: sampled tokens up
to and including EOS) and trained tokens (DPO: chosen + rejected completion tokens with EOS) are
counted per step on both sides with the same definition: TRL's through its reward function /
data collator, rlx's from `train/tokens`. Each side runs `--repeats` times, alternating which
goes first, and the median run is reported. Another process holding a core slows a 2-thread
torch run on 2 cores many times over, so each run waits for a quiet machine, the CPU time other
processes take during it is measured (/proc/stat), and a disturbed run is redone (`--quiet`,
`--retries`, `--max-wait`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL and transformers must not try the hub
os.environ.setdefault("WANDB_MODE", "disabled")

from rlx.base import base_dir, ensure_base  # noqa: E402
from rlx.benchmark import (  # noqa: E402
    Bench,
    interleaved,
    machine,
    machine_line,
    metric,
    quiet_run,
    time_calls,
    trained,
)

MODEL_DIR = base_dir()
BETAS = (0.9, 0.95)  # conf/optimizer/adamw.yaml
DPO_BETA = 0.1  # conf/algo/dpo.yaml


# ---------------------------------------------------------------------------- shared


def steady(times: list[float], tokens: list[int], rollout: list[float] | None = None) -> dict:
    """Per-step figures over steps 2..N (step 1 is the warm-up); `rollout`: seconds spent sampling."""
    assert len(times) == len(tokens), (len(times), len(tokens))
    t, n = times[1:], tokens[1:]
    out = {"s_per_step": sum(t) / len(t), "tokens_per_s": sum(n) / sum(t), "first_step_s": times[0],
           "step_s": times, "step_tokens": tokens}
    if rollout:
        out |= {"rollout_s_per_step": sum(rollout[1:]) / len(t), "step_rollout_s": rollout}
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median s/step (an odd number of repeats picks a real run)."""
    return sorted(runs, key=lambda r: r["s_per_step"])[(len(runs) - 1) // 2]


def stream_order(examples: list[dict], batch_size: int, steps: int, seed: int) -> list[dict]:
    """The examples rlx's loop draws in its first `steps` micro-batches, in order."""
    from rlx.data.stream import ExampleStream

    stream = ExampleStream(examples, batch_size, seed)
    return [ex for _ in range(steps) for ex in stream.next()]


# ---------------------------------------------------------------------------- rlx


def rlx_overrides(work: str, args) -> list[str]:
    common = [
        "model=tiny_sft", "model.device=cpu", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
        f"optimizer.betas=[{BETAS[0]},{BETAS[1]}]", "trainer.lr_scheduler=constant", "trainer.warmup_steps=0",
        f"trainer.max_steps={args.steps}", "trainer.max_grad_norm=1.0", "trainer.grad_accum=1",
        "trainer.precision=fp32", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.eval_samples=4", "trainer.eval_max_new_tokens=8", "trainer.progress=false", f"seed={args.seed}",
    ]  # eval and the checkpoint come once, after the last step, outside the per-step times
    if work == "grpo":
        return [*common, "algo=grpo", "data=reasoning", f"trainer.micro_batch_size={args.prompts}",
                f"algo.group_size={args.group_size}", f"algo.max_new_tokens={args.max_new_tokens}",
                "algo.temperature=1.0", "algo.top_p=1.0", "algo.loss_agg=token_mean", "algo.scale=group",
                "algo.kl_coef=0.0", "algo.dynamic_sampling=false"]  # TRL has no DAPO refills
    return [*common, "algo=dpo", "data=reasoning_pairs", f"trainer.micro_batch_size={args.dpo_pairs}",
            f"algo.beta={DPO_BETA}", "algo.loss_type=sigmoid"]


def run_rlx(work: str, args) -> dict:
    with trained(rlx_overrides(work, args), quiet=True) as t:  # quiet: its summary table
        rows = [r for r in t.rows if "time/update_s" in r]  # training rows (eval rows have no step times)
    times = [r["time/batch_s"] + r["time/update_s"] for r in rows]
    cumulative = [0] + [int(x) for x in metric(rows, "train/tokens")]
    tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
    return {**steady(times, tokens, metric(rows, "rl/rollout_s")), "train_time_s": t.summary["train/time_s"],
            "params_M": t.summary["params_M"]}


# ---------------------------------------------------------------------------- TRL


def trl_common(args, out_dir: str) -> dict:
    return dict(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
        max_grad_norm=1.0, gradient_accumulation_steps=1, gradient_checkpointing=False, bf16=False,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
    )


def trl_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return model, tokenizer


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock timestamps at the start of training and after every optimizer step."""

        def __init__(self):
            self.stamps: list[float] = []

        def on_train_begin(self, *_, **__):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, *_, **__):
            self.stamps.append(time.perf_counter())

        def times(self) -> list[float]:
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return StepTimer()


def trl_reward(task, counts: list[int], seen: list[str]):
    """rlx's exact-answer checker as a TRL reward function; also counts each step's generated tokens
    and records the prompts it was given."""
    from rlx.rewards import Correctness

    correctness = Correctness()

    def correct(prompts, completions, completion_ids, answer, source, question, **_):
        counts.append(sum(len(ids) for ids in completion_ids))  # ids run up to and including EOS
        seen.extend(prompts)
        examples = [{"answer": a, "source": s, "question": q} for a, s, q in zip(answer, source, question)]
        return correctness(completions, examples, task).tolist()

    return correct


def run_trl_grpo(args) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlx.config import build, compose_config

    task = build(compose_config("train", ["data=reasoning"]).data)
    examples = stream_order(task.split("train"), args.prompts, args.steps, args.seed)
    dataset = Dataset.from_list([{k: ex[k] for k in ("prompt", "answer", "source", "question")} for ex in examples])
    model, tokenizer = trl_model()
    counts: list[int] = []
    seen: list[str] = []
    rollout: list[float] = []  # seconds of each `model.generate` call: TRL's sampling
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            **trl_common(args, out_dir), per_device_train_batch_size=args.prompts * args.group_size,
            num_generations=args.group_size, steps_per_generation=1, num_iterations=1,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
            loss_type="dapo", scale_rewards="group", use_vllm=False, shuffle_dataset=False, log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(task, counts, seen), args=config,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        check_tokens(trainer, tokenizer)
        with time_calls(model, "generate", rollout):
            wall = train_quietly(trainer)
    # the same prompts as rlx, in the same order, each sampled group_size times in a row
    assert seen == [ex["prompt"] for ex in examples for _ in range(args.group_size)], "TRL saw other prompts"
    return {**steady(timer.times(), counts, rollout), "train_wall_s": wall}


def train_quietly(trainer) -> float:
    """trainer.train() without its end-of-training metrics print; returns the wall time."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return time.perf_counter() - start


def check_tokens(trainer, tokenizer) -> None:
    """TRL must stop and pad sampling with the same tokens rlx's rollout uses."""
    gen = trainer.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos == [tokenizer.eos_token_id] and gen.pad_token_id == tokenizer.pad_token_id, (eos, gen.pad_token_id)


def run_trl_dpo(args) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlx.config import build, compose_config

    task = build(compose_config("train", ["data=reasoning_pairs"]).data)
    examples = stream_order(task.split("train"), args.dpo_pairs, args.steps, args.seed)
    dataset = Dataset.from_list([{k: ex[k] for k in ("prompt", "chosen", "rejected")} for ex in examples])
    model, tokenizer = trl_model()
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(**trl_common(args, out_dir), per_device_train_batch_size=args.dpo_pairs,
                           train_sampling_strategy="sequential", beta=DPO_BETA, loss_type="sigmoid",
                           max_length=256, precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
        counts = count_completion_tokens(trainer)
        wall = train_quietly(trainer)
    return {**steady(timer.times(), counts), "train_wall_s": wall}


def count_completion_tokens(trainer) -> list[int]:
    """Wrap TRL's collator to count each batch's completion tokens (EOS included): rlx's `num_tokens`."""
    counts: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts.append(int(batch["completion_mask"].sum()))
        return batch

    trainer.data_collator = counting
    return counts


# ---------------------------------------------------------------------------- report


TRL_RUNS = {"grpo": run_trl_grpo, "dpo": run_trl_dpo}


def works_of(args) -> list[tuple[str, argparse.Namespace]]:
    """(label, settings) of each work: GRPO once per `--prompts` value, then DPO."""
    out = []
    for work in args.works.split(","):
        sizes = args.prompts if work == "grpo" else [None]
        for p in sizes:
            label = f"grpo {p}x{args.group_size}" if work == "grpo" else f"dpo {args.dpo_pairs}"
            out.append((label, argparse.Namespace(**{**vars(args), "work": work, "prompts": p})))
    return out


def compare(label: str, args) -> dict:
    """`--repeats` runs of each side, alternating which goes first; the median run of each side."""
    sides = {"trl": TRL_RUNS[args.work], "rlx": lambda a: run_rlx(a.work, a)}
    runs: dict[str, list[dict]] = {"trl": [], "rlx": []}
    rejected: list[dict] = []
    for rep, side in interleaved(sides, args.repeats):
        # quiet_libraries again: saving a checkpoint turns transformers' progress bars back on
        runs[side].append(quiet_run(functools.partial(sides[side], args), args.quiet, args.retries, args.max_wait, rejected,
                                    before=quiet_libraries))
        print(f"{label} {side} run {rep + 1}: {runs[side][-1]['s_per_step']:.3f} s/step", flush=True)
    trl, rlx = median_run(runs["trl"]), median_run(runs["rlx"])
    return {"work": args.work, "prompts": args.prompts, "trl": trl, "rlx": rlx,
            "speedup": trl["s_per_step"] / rlx["s_per_step"], "runs": runs, "rejected": rejected}


def describe(res: dict, c: dict) -> str:
    if res["work"] == "grpo":
        return f"GRPO: {res['prompts']} prompts x {c['group_size']} samples, <= {c['max_new_tokens']} new tokens"
    return f"DPO: {c['dpo_pairs']} pairs (sigmoid)"


def spread(res: dict) -> str:
    """Each side's range of s/step over its runs, and whether the two ranges overlap."""
    lo, hi = ({side: f(run["s_per_step"] for run in runs) for side, runs in res["runs"].items()} for f in (min, max))
    apart = hi["rlx"] < lo["trl"] or hi["trl"] < lo["rlx"]
    return (f"TRL {lo['trl']:.3f}-{hi['trl']:.3f} / rlx {lo['rlx']:.3f}-{hi['rlx']:.3f} "
            f"({'apart' if apart else 'overlapping'})")


def table_rows(r: dict) -> list[str]:
    rows = []
    for res in r["works"].values():
        trl, rlx = res["trl"], res["rlx"]
        rollout = (f"{trl['rollout_s_per_step']:.2f} / {rlx['rollout_s_per_step']:.2f}"
                   if "rollout_s_per_step" in trl else "-")
        rows.append(f"| {describe(res, r['config'])} | {trl['s_per_step']:.3f} | {rlx['s_per_step']:.3f} | "
                    f"**{res['speedup']:.2f}x** | {trl['tokens_per_s']:,.0f} | {rlx['tokens_per_s']:,.0f} | {rollout} |")
    return rows


def others(r: dict) -> str:
    """How much other processes disturbed the reported runs, and how many runs were redone."""
    values = [run["other_cores"] for res in r["works"].values() for side in res["runs"].values() for run in side]
    redone = sum(len(res["rejected"]) for res in r["works"].values())
    return (f"other processes used at most {max(values):.2f} cores during any reported run; {redone} run(s) "
            f"disturbed by more than {r['config']['quiet']} cores were rerun (kept in the JSON under `rejected`)")


def markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    return "\n".join([
        bench.heading, "",
        f"TRL {m['trl']} (`GRPOTrainer`, `DPOTrainer`) and rlx on the same work in one process: the tiny SFT base "
        f"({r['params_M']:.2f}M parameters), fp32 on the CPU, the same prompts / pairs in the same order, AdamW at a "
        f"constant lr {c['lr']}, {c['steps']} optimizer steps per run; s/step is the mean of steps 2..{c['steps']} "
        f"(step 1 is a warm-up), from the median of {c['repeats']} runs of each side (alternating which goes "
        "first). Tokens/s: GRPO's sampled tokens (up to and including EOS), DPO's trained completion tokens "
        "(chosen + rejected), per second of those steps. Rollout: seconds per step in TRL's `model.generate` / "
        "rlx's `rollout.sample`.", "",
        "| work | TRL s/step | rlx s/step | speedup (TRL s / rlx s) | TRL tokens/s | rlx tokens/s | rollout s/step (TRL / rlx) |",
        "|---|---:|---:|---:|---:|---:|---:|", *table_rows(r), "",
        "- Not identical work: each side draws its own samples, so GRPO's response lengths (and so its work per "
        "step) differ by chance; tokens/s is the fairer rate. Both compute GRPO's per-token entropy for their "
        "metrics; TRL's DPO also computes entropies, logit means and top-1 accuracy, which rlx's does not; rlx's "
        "DPO caches reference log-probs per pair, which pays off only from the second epoch (not reached here).",
        "- Per-run s/step over all repeats: " + "; ".join(f"{w} {spread(res)}" for w, res in r["works"].items())
        + "; where the ranges overlap, the difference is within the machine's run-to-run noise.",
        "- Including the warm-up step (median runs): " + "; ".join(
            f"{w} TRL `train()` {res['trl']['train_wall_s']:.1f} s, rlx `train/time_s` {res['rlx']['train_time_s']:.1f} s"
            for w, res in r["works"].items()) + ".",
        f"- Quiet machine: {others(r)}; a job holding a core slows 2-thread torch runs on 2 cores many times over.",
        f"- Machine: {machine_line(m, threads=True, python=True, libs=('torch', 'transformers', 'trl'))}.",
        f"- Command: `{r['command']}` ({r['date']}, {r['wall_min']:.1f} min in all).", ""])


bench = Bench(__doc__, "## RL speed against TRL (bench_rl)", quick={"steps": 3, "repeats": 1})
bench.option("--steps", type=int, default=10, help="optimizer steps per run (the first is not timed)")
bench.option("--repeats", type=int, default=3, help="runs of each side per work; the median is reported")
bench.option("--prompts", type=lambda v: [int(x) for x in v.split(",")], default=[4, 16],
             help="GRPO prompts per step; comma-separated sizes are run one after another")
bench.option("--group-size", type=int, default=8, help="GRPO samples per prompt")
bench.option("--max-new-tokens", type=int, default=64)
bench.option("--dpo-pairs", type=int, default=16, help="DPO pairs per step")
bench.option("--lr", type=float, default=3e-5)
bench.option("--seed", type=int, default=0)
bench.option("--works", default="grpo,dpo", help="comma-separated subset of grpo,dpo")
bench.option("--quiet", type=float, default=0.25, help="most cores other processes may use during a run before it is rerun")
bench.option("--retries", type=int, default=2, help="reruns of a run disturbed by other processes")
bench.option("--max-wait", type=float, default=300, help="seconds to wait for a quiet machine before a run")


def quiet_libraries() -> None:
    """TRL's advice-level warnings and the loaders' progress bars would bury the table."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def measure(args) -> dict:
    if args.steps < 2:
        bench.parser.error("--steps must be >= 2: the first step is a warm-up")
    ensure_base()  # MODEL_DIR, built first if it is not cached
    import trl

    quiet_libraries()
    start = time.perf_counter()
    works = {label: compare(label, settings) for label, settings in works_of(args)}
    return bench.record(machine=machine(trl=trl.__version__), params_M=next(iter(works.values()))["rlx"]["params_M"],
                        config=bench.settings(), works=works, wall_min=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    bench.main(measure, markdown)
