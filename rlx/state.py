"""`TrainState` (everything a step touches) and checkpoints that can be trusted.

A checkpoint is a folder `checkpoints/step_000200/` holding the model in Hugging Face format
(`save_pretrained`: transformers loads it without rlx), the tokenizer, the composed config
(`rlx_config.yaml`) and `trainer_state.pt` (optimizer, scheduler, step, RNG states, data
position, hook states). It is written under a temporary name and renamed into place, and
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
    """Write `root/step_XXXXXX` atomically, point `root/last` at it, keep the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()  # a bar per checkpoint would break the training bar
    try:
        state.model.save_pretrained(tmp)
    finally:
        hf_logging.enable_progress_bar()
    state.tokenizer.save_pretrained(tmp)
    if config is not None:
        OmegaConf.save(config, tmp / "rlx_config.yaml", resolve=True)
    trainer = {
        "step": state.step,
        "tokens": state.tokens,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": rng_state(),
        **extra,
    }
    torch.save(trainer, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    link = root / ".last.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / "last")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


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


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load `save_pretrained` weights into an already-built model (full model or PEFT adapter)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RlxError(f"checkpoint {folder} holds no .safetensors weights")
    try:
        weights = {k: v for f in files for k, v in load_file(f).items()}
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise RlxError(f"checkpoint {folder} is corrupt: {str(e).splitlines()[0]}") from None
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
    load_model_weights(state.model, folder)
    state.optimizer.load_state_dict(trainer.pop("optimizer"))
    state.scheduler.load_state_dict(trainer.pop("scheduler"))
    state.step, state.tokens = trainer.pop("step"), trainer.pop("tokens")
    set_rng_state(trainer.pop("rng"))
    return trainer
