"""Shared fixtures: a shrunken train config (tiny model, a few steps, no progress bar)."""
import os

# Tests never reach a model hub: a hub name must fail at once, as it does on an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

from rlx.config import compose_config  # noqa: E402

# A model and data set small enough that a training step takes milliseconds.
SMALL = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.num_train=256",
    "data.num_validation=8",
    "data.num_test=8",
    "trainer.max_steps=2",
    "trainer.micro_batch_size=4",
    "trainer.log_every=1",
    "trainer.warmup_steps=0",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.eval_samples=4",
    "trainer.eval_max_new_tokens=8",
    "trainer.progress=false",
]


def small_config(*overrides: str):
    """SMALL plus `overrides`; choosing another group option (`model=hf`) drops SMALL's keys for that group."""
    chosen = {o.split("=")[0] for o in overrides if "." not in o.split("=")[0]}
    base = [o for o in SMALL if o.split(".")[0] not in chosen]
    return compose_config("train", [*base, *overrides])


@pytest.fixture
def cfg():
    return small_config()


def straight_and_resumed(tmp_path, overrides: list[str], steps: int = 4, cut: int = 2):
    """Run `steps` steps straight, and `cut` steps then a resume to `steps` (save every `cut`):
    both summaries and both final weights, to compare for exact resume."""
    from safetensors.torch import load_file

    from rlx.tasks import run_training

    over = [*overrides, f"trainer.save_every={cut}"]
    full = run_training(small_config(*over, f"trainer.max_steps={steps}"), tmp_path / "full")
    run_training(small_config(*over, f"trainer.max_steps={cut}"), tmp_path / "cut")
    resumed = run_training(small_config(*over, f"trainer.max_steps={steps}", "trainer.resume=auto"), tmp_path / "cut")
    weights = [load_file(tmp_path / run / "checkpoints/last/model.safetensors") for run in ("full", "cut")]
    return full, resumed, *weights
