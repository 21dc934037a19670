"""Loop overhead: tokens/s of rlx's training loop against a bare PyTorch loop and HF Trainer.

    python scripts/bench_loop.py                 # 100 steps, 3 interleaved repeats (`make bench`)
    python scripts/bench_loop.py --quick         # 10 steps, 1 repeat: a smoke test (outputs/bench-quick/)
    python scripts/bench_loop.py --report        # re-render the RESULTS.md section from the JSON

All three loops do the same work: `rlx train algo=sft` with the default config (model=tiny,
data=reasoning, optimizer=adamw, micro-batch 32, fp32), the same initial weights (the tiny
model is seeded by `model.seed`), the same micro-batches in the same order (rlx's
ExampleStream with the run's seed, tokenized by `lm_batch` inside every loop), the same
AdamW, cosine schedule with warmup and gradient clipping. They are checked to have done it:
the 10-step mean training losses and the final weights are compared with the bare loop's.

* bare     a hand-written loop: stream -> lm_batch -> forward -> token-mean CE -> backward ->
           clip -> AdamW step -> scheduler step. Timed from building the stream to the end.
* rlx      `rlx.loop.train()` with a real TrainState, HookList (the no-op `quantizer=none`),
           JsonlLogger (into a temp dir), log_every=10 and the tqdm bar on stderr, as a user
           has it. Eval and saving run only once, at the end (eval_samples=0, so the eval is
           nearly empty); the timed figure is train() end to end minus the time spent inside
           that final evaluate() and save_checkpoint(). Both numbers are reported, with the
           loop's own `train/time_s` (the sum of its per-step times).
* trainer  `transformers.Trainer.train()` end to end on a Dataset of the same examples in
           stream order (sequential sampler) and a collator calling `lm_batch`, given the
           same optimizer and scheduler objects; its logging, saving, eval, progress bar
           and reporting are off. Building the Trainer is not timed.

Runs are interleaved after one short untimed warm-up of each, so that another process
slowing the machine hits all three alike, and the order rotates each repeat (bare, rlx,
trainer; rlx, trainer, bare; ...) so that no loop always runs first; medians are
reported. Results go to docs/results/bench_loop.json and to the "Loop overhead (bench_loop)"
section of docs/RESULTS.md, which is rewritten in place.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PrinterCallback, Trainer, TrainingArguments

import rlx.loop
from rlx.benchmark import Bench, interleaved, machine_line, metric, time_calls
from rlx.config import build, compose_config
from rlx.data.collate import IGNORE, lm_batch
from rlx.data.stream import ExampleStream
from rlx.hooks import HookList
from rlx.loop import TrainerConfig, make_scheduler
from rlx.seeding import seed_everything
from rlx.state import TrainState

bench = Bench(__doc__, "## Loop overhead (bench_loop)", quick={"steps": 10, "repeats": 1})
bench.option("--steps", type=int, default=100, help="optimizer steps per run")
bench.option("--repeats", type=int, default=3, help="interleaved repeats of each loop")
LOOPS = ("bare", "rlx", "trainer")
WARMUP_STEPS = 3


@dataclasses.dataclass
class Setup:
    """What every loop shares: the composed config and the data set (generated once)."""

    cfg: DictConfig
    trainer: TrainerConfig
    task: object
    algo: object


@dataclasses.dataclass
class Run:
    loop: str
    wall_s: float  # the timed region described in the module docstring
    tokens: int  # target tokens (labelled tokens after the shift), as the rlx loop counts them
    losses: list[float]  # mean training loss of each log_every-step window
    weights: torch.Tensor  # final parameters, flattened, for the agreement check
    extra: dict = dataclasses.field(default_factory=dict)


def make_setup(steps: int) -> Setup:
    cfg = compose_config("train", [
        f"trainer.max_steps={steps}",
        "trainer.log_every=10",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.eval_samples=0",
        # auto is fp32 on a CPU; pinning it keeps the three loops doing the same math on a GPU.
        "trainer.precision=fp32",
    ])
    task = build(cfg.data)
    task.split("train")  # generate the data now, not inside the first timed run
    return Setup(cfg, TrainerConfig.from_config(cfg.trainer), task, build(cfg.algo))


def fresh_state(setup: Setup) -> TrainState:
    """A new model (the same weights every time: its init is seeded), optimizer and scheduler,
    built as run_training builds them."""
    seed_everything(setup.cfg.seed)
    policy = build(setup.cfg.model)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = build(setup.cfg.optimizer)(params)
    return TrainState(policy.model, policy.tokenizer, optimizer, make_scheduler(optimizer, setup.trainer))


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def window_means(losses: list[float], every: int) -> list[float]:
    """Per-step losses -> the means the rlx loop logs every `every` steps (the last window may be short)."""
    return [sum(losses[i : i + every]) / len(losses[i : i + every]) for i in range(0, len(losses), every)]


def num_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------------------- the three loops


def bare_loss(model: torch.nn.Module, batch: dict, n: int) -> torch.Tensor:
    """Token-mean cross-entropy over the completion: the same math as rlx's SFT.loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return nll / n


def run_bare(setup: Setup) -> Run:
    state = fresh_state(setup)
    model, tokenizer, optimizer, scheduler = state.model, state.tokenizer, state.optimizer, state.scheduler
    max_length, tc = setup.algo.max_length, setup.trainer
    model.train()
    losses, tokens = [], 0
    t0 = time.perf_counter()
    stream = ExampleStream(setup.task.split("train"), tc.micro_batch_size, setup.cfg.seed)
    for _ in range(tc.max_steps):
        batch = {k: v.to(model.device) for k, v in lm_batch(stream.next(), tokenizer, max_length).items()}
        n = num_targets(batch["labels"])
        loss = bare_loss(model, batch, n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        tokens += n
    losses = [float(x) for x in losses]  # inside the clock: on a GPU this waits for the last step
    wall = time.perf_counter() - t0
    return Run("bare", wall, tokens, window_means(losses, tc.log_every), flat_weights(model))


def run_rlx(setup: Setup) -> Run:
    state = fresh_state(setup)
    cfg = setup.cfg
    hooks = HookList({"quantizer": build(cfg.quantizer), **{name: build(h) for name, h in cfg.hooks.items()}})
    eval_s, save_s = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        logger = build(cfg.logger, run_dir=Path(run_dir))
        logger.log_config(cfg)
        with time_calls(rlx.loop, "evaluate", eval_s), time_calls(rlx.loop, "save_checkpoint", save_s):
            t0 = time.perf_counter()
            state.task, state.trainer, state.run_dir = setup.task, setup.trainer, Path(run_dir)
            final = rlx.loop.train(state, setup.algo, hooks, logger, seed=cfg.seed, config=cfg)
            end_to_end = time.perf_counter() - t0
        logger.finish()
        losses = metric(Path(run_dir), "train/loss")
    eval_save = sum(eval_s) + sum(save_s)
    extra = {"end_to_end_s": end_to_end, "final_eval_s": sum(eval_s), "final_save_s": sum(save_s),
             "loop_train_time_s": final["train/time_s"]}
    return Run("rlx", end_to_end - eval_save, state.tokens, losses, flat_weights(state.model), extra)


class _RecordingTrainer(Trainer):
    """Keeps each step's loss (a detached tensor, so no device sync) for the agreement check."""

    step_losses: list

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss)
        return loss


def run_trainer(setup: Setup) -> Run:
    state = fresh_state(setup)
    tc, tokenizer, max_length = setup.trainer, state.tokenizer, setup.algo.max_length
    # The rlx stream's micro-batches laid end to end: a sequential sampler cuts them out again.
    stream = ExampleStream(setup.task.split("train"), tc.micro_batch_size, setup.cfg.seed)
    examples = [ex for _ in range(tc.max_steps) for ex in stream.next()]
    tokens: list[int] = []

    def collate(batch_examples: list[dict]) -> dict:
        batch = lm_batch(batch_examples, tokenizer, max_length)
        tokens.append(num_targets(batch["labels"]))
        return batch

    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=tc.max_steps, per_device_train_batch_size=tc.micro_batch_size,
            max_grad_norm=tc.max_grad_norm,
            train_sampling_strategy="sequential", remove_unused_columns=False, dataloader_pin_memory=False,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, seed=setup.cfg.seed,
        )
        trainer = _RecordingTrainer(model=state.model, args=args, train_dataset=examples, data_collator=collate,
                                    optimizers=(state.optimizer, state.scheduler))
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict to stdout
        trainer.step_losses = []
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    losses = [float(x) for x in trainer.step_losses]
    return Run("trainer", wall, sum(tokens), window_means(losses, tc.log_every), flat_weights(state.model))


RUNNERS = {"bare": run_bare, "rlx": run_rlx, "trainer": run_trainer}


# ---------------------------------------------------------------------------- measuring and reporting


def measure_runs(setup: Setup, repeats: int) -> list[tuple[int, Run, float]]:
    """(repeat, run, 1-minute load average at its start) for every timed run, interleaved."""
    warmup = dataclasses.replace(setup, trainer=dataclasses.replace(setup.trainer, max_steps=WARMUP_STEPS))
    for loop in LOOPS:  # first calls pay one-off costs (lazy imports, allocator, kernel selection)
        RUNNERS[loop](warmup)
    runs = []
    for r, loop in interleaved(LOOPS, repeats):
        load = os.getloadavg()[0]
        run = RUNNERS[loop](setup)
        print(f"repeat {r + 1}/{repeats} {loop:8s} {run.wall_s:7.2f} s  {run.tokens / run.wall_s:8.0f} tokens/s",
              file=sys.stderr)
        runs.append((r, run, load))
    return runs


def max_abs_diff(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def summarize(runs: list[tuple[int, Run, float]], setup: Setup) -> dict:
    by_loop = {loop: [run for _, run, _ in runs if run.loop == loop] for loop in LOOPS}
    tokens = {run.tokens for _, run, _ in runs}
    if len(tokens) != 1:
        raise SystemExit(f"the loops trained on different token counts {sorted(tokens)}: not the same work")
    tokens = tokens.pop()
    median = {loop: statistics.median(r.wall_s for r in rs) for loop, rs in by_loop.items()}
    spread = {loop: [min(r.wall_s for r in rs), max(r.wall_s for r in rs)] for loop, rs in by_loop.items()}
    rlx_extra = {k: statistics.median(r.extra[k] for r in by_loop["rlx"]) for k in by_loop["rlx"][0].extra}
    per_repeat = list(zip(*by_loop.values()))  # (bare, rlx, trainer) of each repeat
    agreement = {}
    for loop in ("rlx", "trainer"):
        agreement[f"{loop}_vs_bare_loss_max_abs"] = max(max_abs_diff(rs[LOOPS.index(loop)].losses, rs[0].losses)
                                                        for rs in per_repeat)
        agreement[f"{loop}_vs_bare_weights_max_abs"] = max(max_abs_diff(rs[LOOPS.index(loop)].weights, rs[0].weights)
                                                           for rs in per_repeat)
    return {
        "tokens": tokens,
        "tokens_per_step": tokens / setup.trainer.max_steps,
        "runs": [{"repeat": r, "loop": run.loop, "wall_s": run.wall_s, "tokens_per_s": tokens / run.wall_s,
                  "loadavg_1m_at_start": load, **run.extra} for r, run, load in runs],
        "median_wall_s": median,
        "range_wall_s": spread,  # the same work's run-to-run spread: the noise floor of the ratios
        "median_tokens_per_s": {loop: tokens / s for loop, s in median.items()},
        "median_rlx": rlx_extra,
        "ratios": {
            "rlx/bare": median["bare"] / median["rlx"],  # tokens/s ratio: below 1 is slower than bare
            "trainer/bare": median["bare"] / median["trainer"],
            "per_repeat_rlx/bare": [b.wall_s / x.wall_s for b, x, _ in per_repeat],
            "per_repeat_trainer/bare": [b.wall_s / t.wall_s for b, _, t in per_repeat],
        },
        "loss_agreement": agreement,
        "final_window_loss": {loop: rs[0].losses[-1] for loop, rs in by_loop.items()},
    }


def markdown(result: dict) -> str:
    s, m, cfg = result["summary"], result["machine"], result["config"]
    rlx, agree = s["median_rlx"], s["loss_agreement"]
    rows = [f"| {loop} | {s['median_tokens_per_s'][loop]:,.0f} | {s['median_wall_s'][loop]:.2f} | "
            f"{s['range_wall_s'][loop][0]:.2f}-{s['range_wall_s'][loop][1]:.2f} | "
            f"{s['median_wall_s']['bare'] / s['median_wall_s'][loop]:.3f} |" for loop in LOOPS]
    noise = max((hi - lo) / s["median_wall_s"][loop] for loop, (lo, hi) in s["range_wall_s"].items())
    return "\n".join([
        bench.heading,
        "",
        f"Tokens/s of `rlx train algo=sft` (default config: model=tiny, data=reasoning, optimizer=adamw, "
        f"micro-batch {cfg['micro_batch_size']}, fp32) against a bare hand-written PyTorch loop and "
        f"`transformers.Trainer`, on the same initial weights, the same {cfg['steps']} micro-batches in the same "
        f"order ({s['tokens_per_step']:.0f} target tokens per step) and the same AdamW, cosine schedule and "
        f"clipping. Median of {cfg['repeats']} interleaved repeats.",
        "",
        "| loop | tokens/s | time (s), median | time (s), min-max | tokens/s vs bare |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"- rlx overhead vs the bare loop: **{(1 / s['ratios']['rlx/bare'] - 1) * 100:+.1f}%** time "
        f"(per repeat: {', '.join(f'{(1 / x - 1) * 100:+.1f}%' for x in s['ratios']['per_repeat_rlx/bare'])}); "
        f"the same loop's times spread by up to {noise * 100:.0f}% of their median here, so smaller "
        "differences are noise.",
        f"- rlx timing: `train()` end to end {rlx['end_to_end_s']:.2f} s, minus the single final eval "
        f"({rlx['final_eval_s']:.2f} s, eval_samples=0) and checkpoint save ({rlx['final_save_s']:.2f} s) = "
        f"the rlx row; the loop's own `train/time_s` (per-step times summed) is {rlx['loop_train_time_s']:.2f} s. "
        "Hooks: the no-op `quantizer=none`; JsonlLogger every 10 steps; tqdm bar on stderr "
        f"({'a terminal' if cfg['stderr_is_tty'] else 'redirected to a file'}).",
        "- bare: timed from building the ExampleStream to the last step (tokenization included, as in rlx). "
        "Trainer: `trainer.train()` end to end, with logging, saving, eval and its progress bar off.",
        "- Same work: max |Δ| of the 10-step mean training loss vs bare: "
        f"rlx {agree['rlx_vs_bare_loss_max_abs']:.1e}, "
        f"Trainer {agree['trainer_vs_bare_loss_max_abs']:.1e}; of the final weights: rlx "
        f"{agree['rlx_vs_bare_weights_max_abs']:.1e}, Trainer {agree['trainer_vs_bare_weights_max_abs']:.1e}. "
        f"Last-window loss {s['final_window_loss']['bare']:.4f}.",
        f"- Machine: {machine_line(m, threads=True, python=True, libs=('torch', 'transformers'))}. "
        f"1-minute load average at run starts: {min(r['loadavg_1m_at_start'] for r in s['runs']):.1f}"
        f"-{max(r['loadavg_1m_at_start'] for r in s['runs']):.1f} (this benchmark alone makes about "
        f"{m['torch_threads']}).",
        f"- Command: `{result['command']}` ({result['date']}, {result['duration_s'] / 60:.1f} min in all).",
        "",
    ])


def measure(args) -> dict:
    t_start = time.perf_counter()
    setup = make_setup(args.steps)
    summary = summarize(measure_runs(setup, args.repeats), setup)
    return bench.record(
        duration_s=time.perf_counter() - t_start,
        config={"steps": args.steps, "repeats": args.repeats, "micro_batch_size": setup.trainer.micro_batch_size,
                "max_length": setup.algo.max_length, "stderr_is_tty": sys.stderr.isatty(),  # where tqdm draws
                "trainer": dataclasses.asdict(setup.trainer),
                "model": OmegaConf.to_container(setup.cfg.model),
                "optimizer": OmegaConf.to_container(setup.cfg.optimizer)},
        summary=summary)


if __name__ == "__main__":
    bench.main(measure, markdown)
