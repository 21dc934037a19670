"""Every option of every config group composes, and builds where this machine can build it."""
import pytest
import torch

from rlx.config import GROUPS, build, group_options
from rlx.loop import TrainerConfig
from tests.conftest import small_config

# Options that need what a CPU-only, offline machine lacks.
NEEDS = {
    ("model", "hf"): "a hub model name (model.name_or_path)",
    ("optimizer", "adamw8bit"): "a CUDA device",
    ("data", "gsm8k"): "data.path",
}
CASES = [(g, o) for g in GROUPS for o in group_options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes(group, option):
    cfg = small_config(f"{group}={option}")
    TrainerConfig.from_config(cfg.trainer)
    assert cfg[group] is not None


@pytest.mark.parametrize("group,option", [c for c in CASES if c not in NEEDS and c[0] in ("algo", "optimizer", "quantizer", "hooks")])
def test_every_option_builds(group, option):
    cfg = small_config(f"{group}={option}")
    obj = build(cfg[group]) if cfg[group].get("_target_") else {k: build(v) for k, v in cfg[group].items()}
    if group == "optimizer":
        obj([torch.nn.Parameter(torch.zeros(2))])
    assert obj is not None


def test_tiny_model_and_default_data_build():
    cfg = small_config()
    policy, task = build(cfg.model), build(cfg.data)
    assert policy.model.config.vocab_size == len(policy.tokenizer)
    assert len(task.split("train")) > 0
