"""The one training loop. It knows nothing of any particular method: the algorithm makes
batches and losses, hooks act at fixed events (rlx/hooks.py), and the loop does the rest:
gradient accumulation, clipping, LR schedule, mixed precision, logging, eval, checkpoints,
resume, the NaN guard, and a memory report after the first step: what weights and optimizer state
hold (per parameter group) and the peak of the step.

Under torchrun (`trainer.strategy=ddp|fsdp2`, rlx/distributed.py) every rank runs this loop on its
share of the micro-batches; the loop weighs them by the global target count, sums the metrics
over ranks, and lets rank 0 alone log, evaluate and write. Each micro-batch samples and computes
its loss under an RNG seeded from (seed, step, its global index), so N ranks draw what one
process with N times the accumulation draws, and the RNG the hooks see stays equal on all ranks.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from rlx.data.stream import ExampleStream, NextBatch
from rlx.distributed import SINGLE, STRATEGIES
from rlx.errors import RlxError
from rlx.evaluate import evaluate
from rlx.hooks import HookList
from rlx.memory import StepPeak, memory_report
from rlx.state import TrainState, find_checkpoint, load_checkpoint, save_checkpoint

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class TrainerConfig:
    """The `trainer:` section of conf/train.yaml (the values live there; see its comments).
    Types are checked when a run starts."""

    max_steps: int
    micro_batch_size: int
    grad_accum: int
    max_grad_norm: float  # 0 disables clipping
    lr_scheduler: str
    warmup_steps: int
    precision: str  # auto (bf16 on a CUDA device that has it, else fp32) | fp32 | bf16
    log_every: int
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end
    keep_last: int
    resume: str | None  # null | auto (this run dir's last checkpoint, if any) | a path
    progress: bool
    eval_split: str
    eval_samples: int
    eval_batch_size: int
    eval_max_new_tokens: int
    eval_max_length: int
    logprob_chunk: int = 0  # > 0: RL log-probs through the LM head this many positions at a time (rlx.rollout)
    strategy: str = "single"  # single | ddp | fsdp2 (under torchrun: rlx/distributed.py)

    @classmethod
    def from_config(cls, node: DictConfig) -> TrainerConfig:
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        except OmegaConfBaseException as e:
            raise RlxError(f"bad trainer.{e.full_key}: {str(e).splitlines()[0]}") from None
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise RlxError(f"trainer settings missing: {', '.join('trainer.' + k for k in missing)}")
        cfg = cls(**OmegaConf.to_container(merged))
        if cfg.strategy not in STRATEGIES:
            raise RlxError(f"unknown trainer.strategy={cfg.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if cfg.lr_scheduler not in SCHEDULES:
            raise RlxError(f"unknown trainer.lr_scheduler={cfg.lr_scheduler!r}; valid: {', '.join(SCHEDULES)}")
        if cfg.precision not in ("auto", "fp32", "bf16"):
            raise RlxError(f"unknown trainer.precision={cfg.precision!r}; valid: auto, fp32, bf16")
        if cfg.logprob_chunk < 0:
            raise RlxError("trainer.logprob_chunk must be >= 0 (0: the whole response at once)")
        if min(cfg.max_steps, cfg.micro_batch_size, cfg.grad_accum, cfg.log_every) < 1:
            raise RlxError("trainer.max_steps, micro_batch_size, grad_accum and log_every must be >= 1")
        return cfg


def make_scheduler(optimizer, cfg: TrainerConfig):
    from transformers.optimization import get_scheduler  # imported here: it pulls in peft (seconds)

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.max_steps)


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for, or on `auto` where a CUDA device supports it; else fp32."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def micro_batch_rng(seed: int, step: int, index: int, phase: int, device: torch.device):
    """Torch's RNG seeded from (seed, step, the micro-batch's global index, phase) for the duration,
    and restored after: what a micro-batch draws depends on where it is in the run, not on which
    rank draws it or what was drawn before."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((((seed * 1_000_003) + step) * 10_007 + index) * 2 + phase)
        yield


def _resume_from(cfg: TrainerConfig, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last"
        return last.resolve() if last.exists() else None
    return find_checkpoint(cfg.resume)


def train(state: TrainState, algo, hooks: HookList, logger, *, seed: int = 0,
          config: DictConfig | None = None) -> dict:
    """Run `state.trainer.max_steps` optimizer steps on `state.task` into `state.run_dir`;
    returns the final metrics. `config` is the composed config, saved with each checkpoint."""
    model, device, task, cfg, run_dir = state.model, state.model.device, state.task, state.trainer, state.run_dir
    par = state.parallel or SINGLE
    stream = ExampleStream(task.split("train"), cfg.micro_batch_size, seed, par.rank, par.world)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]  # incl. a critic's
    ckpt_root = run_dir / "checkpoints"
    resume = _resume_from(cfg, run_dir)
    if resume is not None:
        rest = load_checkpoint(state, resume)
        stream.load_state_dict(rest["data"])
        hooks.load_state_dict(rest["hooks"])
        algo.load_state_dict(rest.get("algo", {}))  # e.g. PPO's critic and the rollout it is replaying

    def save() -> Path:
        extra = {"data": stream.state_dict(), "hooks": hooks.state_dict(), "algo": algo.state_dict()}
        return save_checkpoint(state, ckpt_root, extra, config, cfg.keep_last)

    def run_eval() -> dict:
        with par.gathered(model):  # rank 0 evaluates; the others wait
            ev = evaluate(model, state.tokenizer, task, cfg.eval_split, cfg.eval_samples, cfg.eval_batch_size,
                          cfg.eval_max_new_tokens, cfg.eval_max_length) if par.is_main else {}
            par.barrier()
        return ev

    def micro(g: int, phase: int):  # the RNG of this rank's g-th micro-batch of the step
        return micro_batch_rng(seed, state.step, g * par.world + par.rank, phase, device)

    hooks.on_train_start(state)
    start_step = state.step
    model.train()
    # disable=None: tqdm draws only on a terminal, so logs and CI output stay readable
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train",
               disable=None if cfg.progress and par.is_main else True, dynamic_ncols=True)
    window: dict[str, float] = {}
    train_time, tokens0, last = 0.0, state.tokens, {}  # train_time excludes eval and saving
    peak = StepPeak(model, state.optimizer)  # the first step's peak memory
    try:
        while state.step < cfg.max_steps:
            t_step = time.perf_counter()
            first = state.step == start_step
            if first:  # optimizer states exist from the first step on: measure that one
                peak.start()
            hooks.on_step_start(state)
            batches = []
            with par.gathered(model):  # FSDP2: sampling with the whole model on every rank
                for g in range(cfg.grad_accum):
                    with micro(g, 0):
                        batches.append(algo.make_batch(NextBatch(stream), state))
            t_update = time.perf_counter()
            # micro-batches weigh by their share of the step's targets on all ranks; DDP and FSDP2
            # average gradients over ranks, so each rank's share is scaled up by the world size
            total, tokens = par.sum([sum(b["num_targets"] for b in batches),
                                     sum(b.get("num_tokens", b["num_targets"]) for b in batches)]).tolist()
            step_metrics: dict[str, float] = {"time/batch_s": t_update - t_step}  # RL: rollouts, rewards, reference
            for g, batch in enumerate(batches):
                weight = batch["num_targets"] / total
                with micro(g, 1), autocast(device, cfg.precision):
                    loss, metrics = algo.loss(batch, state)
                if not torch.isfinite(loss):
                    raise RlxError(f"loss is {loss.item()} at step {state.step + 1}; stopped, the last good "
                                   f"checkpoint is {ckpt_root / 'last' if (ckpt_root / 'last').exists() else 'none (nothing saved yet)'}")
                with par.gradient_sync(model, enabled=g == len(batches) - 1):
                    (loss * (weight * par.world)).backward()
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + float(v) * weight
            par.sync_extra_grads(params, model)
            step_metrics = par.reduce_metrics(step_metrics)
            hooks.on_after_backward(state)
            if cfg.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                    grad_norm = grad_norm.full_tensor()
                if not torch.isfinite(grad_norm):
                    raise RlxError(f"gradient norm is {grad_norm.item()} at step {state.step + 1}; stopped before "
                                   "the update, the last good checkpoint is intact")
                step_metrics["train/grad_norm"] = grad_norm.item()
            hooks.on_before_optimizer_step(state)
            step_metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]  # as the step uses it (hooks may scale it)
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += int(tokens)
            hooks.on_step_end(state)
            step_metrics["time/update_s"] = time.perf_counter() - t_update
            bar.update(1)
            reported = hooks.pop_metrics()  # one-off values (a phase switch, a hook's scratch): not averaged
            if first:
                reported["memory/step_peak_MB"] = peak.stop()
                reported.update({f"memory/{k}": v for k, v in memory_report(model, state.optimizer, hooks.held_tensors()).items()})

            for k, v in step_metrics.items():
                window[k] = window.get(k, 0.0) + v
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                n = cfg.log_every if state.step % cfg.log_every == 0 else state.step % cfg.log_every
                logged = {k: v / n for k, v in window.items()}
                logged["train/tokens_per_s"] = (state.tokens - tokens0) / (train_time + time.perf_counter() - t_step)
                logged["train/tokens"] = state.tokens
                reported, logged = {}, {**logged, **reported}
                logger.log(logged, state.step)
                bar.set_postfix(loss=f"{logged.get('train/loss', float('nan')):.4f}")
                last.update(logged)
                window = {}
            if reported:  # not a logging step: the one-off values get a row of their own
                logger.log(reported, state.step)
                last.update(reported)
            train_time += time.perf_counter() - t_step
            final = state.step == cfg.max_steps
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or final:
                ev = run_eval()
                logger.log(ev, state.step)
                last.update(ev)
            if (cfg.save_every and state.step % cfg.save_every == 0) or final:
                last["checkpoint"] = str(save())
    finally:  # a step that raised must not leave the profiler running
        peak.close()
    bar.close()
    hooks.on_train_end(state)
    last.update(hooks.pop_metrics())
    last.update({"steps": state.step, "train/time_s": train_time,
                 "train/tokens_per_s": (state.tokens - tokens0) / train_time if train_time else 0.0})
    return last
