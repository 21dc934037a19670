"""`TrainState` (everything a step touches) and checkpoints that can be trusted.

A checkpoint is a folder `checkpoints/step_000200/` holding the model in Hugging Face format
(`save_pretrained`: transformers loads it without rlx), the tokenizer, the composed config
(`rlx_config.yaml`) and `trainer_state.pt` (optimizer, scheduler, step, RNG states, data
position, hook states; under FSDP2 the optimizer state is in `optimizer/` instead, one shard per
rank). It is written under a temporary name and renamed into place, and
`checkpoints/last` is a symlink swapped atomically, so a crash never leaves a half-written
checkpoint behind `last`.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from rlx.errors import RlxError

STATE_FILE = "trainer_state.pt"
SHARDED_OPTIMIZER = "optimizer"  # FSDP2: every rank's shard of the optimizer state (torch.distributed.checkpoint)


@dataclass
class TrainState:
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    task: Any = None  # the data task: its splits and its answer checker (RL rewards use it)
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # target tokens trained on
    run_dir: Path | None = None  # the run's folder: where checkpoints go and hooks write their exports
    trainer: Any = None  # the run's TrainerConfig (max_steps, grad_accum, ...), for hooks and algorithms
    parallel: Any = None  # rlx.distributed.Parallel: this rank's place under torchrun (None: one process)


# ---------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save


def save_checkpoint(state: TrainState, root: Path, extra: dict, config: DictConfig | None, keep_last: int) -> Path:
    """Write `root/step_XXXXXX` atomically, point `root/last` at it, keep the newest `keep_last`.
    Under data parallelism rank 0 writes and every rank waits until it has; under FSDP2 the
    weights are gathered to rank 0 first and every rank writes its shard of the optimizer state
    (torch.distributed.checkpoint) into the same temporary folder."""
    from rlx.distributed import SINGLE, full_model_state, save_sharded_optimizer

    par = state.parallel or SINGLE
    sharded = par.strategy == "fsdp2"
    final = root / f"step_{state.step:06d}"
    tmp = root / f".{final.name}.tmp"
    if par.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        model_state = None
        if sharded:
            par.barrier()  # the folder is clean before any rank writes to it
            model_state = full_model_state(state.model)
            save_sharded_optimizer(state.model, state.optimizer, tmp / SHARDED_OPTIMIZER)
        if par.is_main:
            _write_checkpoint(state, tmp, extra, config, model_state)
            _publish(root, tmp, final, keep_last)
    finally:
        par.barrier()
    return final


def _write_checkpoint(state: TrainState, tmp: Path, extra: dict, config: DictConfig | None,
                      model_state: dict | None) -> None:
    hf_logging.disable_progress_bar()  # a bar per checkpoint would break the training bar
    try:
        state.model.save_pretrained(tmp, state_dict=model_state)  # None: the model's own
    finally:
        hf_logging.enable_progress_bar()
    state.tokenizer.save_pretrained(tmp)
    if config is not None:
        OmegaConf.save(config, tmp / "rlx_config.yaml", resolve=True)
    trainer = {
        "step": state.step,
        "tokens": state.tokens,
        "scheduler": state.scheduler.state_dict(),
        "rng": rng_state(),
        **extra,
    }
    if model_state is None:  # sharded optimizer state is in SHARDED_OPTIMIZER instead
        trainer["optimizer"] = state.optimizer.state_dict()
    torch.save(trainer, tmp / STATE_FILE)


def _publish(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rename the finished `tmp` into place and swap `root/last` to it, then prune old ones."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    link = root / ".last.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / "last")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------- resume


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint, a `checkpoints/` folder or a run folder."""
    p = Path(path).expanduser()
    for candidate in (p, p / "last", p / "checkpoints" / "last"):
        if (candidate / STATE_FILE).is_file() or (candidate / "config.json").is_file() and candidate.is_dir():
            return candidate.resolve()
    if not p.exists():
        raise RlxError(f"checkpoint {str(path)!r} does not exist")
    raise RlxError(f"{str(path)!r} holds no checkpoint (expected {STATE_FILE} or a checkpoints/last link)")


def _read_weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RlxError(f"checkpoint {folder} holds no .safetensors weights")
    try:
        return {k: v for f in files for k, v in load_file(f).items()}
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise RlxError(f"checkpoint {folder} is corrupt: {str(e).splitlines()[0]}") from None


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load `save_pretrained` weights into an already-built model (full model or PEFT adapter)."""
    weights = _read_weights(folder)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RlxError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(state: TrainState, folder: Path) -> dict:
    """Restore model, optimizer, scheduler, counters and RNG from `folder`; returns the rest
    (data position, hook states) for their owners."""
    try:
        trainer = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise RlxError(f"{folder} is not a training checkpoint (no {STATE_FILE})") from None
    except Exception as e:
        raise RlxError(f"checkpoint {folder} is corrupt: {str(e).splitlines()[0]}") from None
    if "optimizer" in trainer:
        load_model_weights(state.model, folder)
        state.optimizer.load_state_dict(trainer.pop("optimizer"))
    else:  # written under FSDP2: full weights into this rank's shards, its optimizer shard from the folder
        from rlx.distributed import load_sharded

        load_sharded(state.model, state.optimizer, _read_weights(folder), folder / SHARDED_OPTIMIZER)
    state.scheduler.load_state_dict(trainer.pop("scheduler"))
    state.step, state.tokens = trainer.pop("step"), trainer.pop("tokens")
    set_rng_state(trainer.pop("rng"))
    return trainer
