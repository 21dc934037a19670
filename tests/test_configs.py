"""Every option of every config group composes, and builds where this machine can build it."""
from pathlib import Path

import pytest
import torch

from rlx.config import COMMAND_GROUPS, GROUPS, build, compose_config, group_options, require_complete
from rlx.errors import RlxError
from rlx.loop import TrainerConfig
from rlx.paths import REPO_ROOT
from tests.support import small_config

GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
# Options that need what this machine may lack, and the overrides that supply it.
NEEDS = {
    ("model", "hf"): None,  # a hub model: tests never reach a hub
    ("model", "tiny_sft"): None,  # built on first use: minutes of training (tests/test_first_run.py, slow)
    ("model", "tiny_sft_hard"): None,  # the same, on data=reasoning_hard (tests/test_hard_task.py builds a small one)
    ("model", "tiny_sft_fold"): None,  # tiny_sft_hard after more SFT on folded traces: built on first use too
    ("rollout", "vllm"): None,  # vLLM on a CUDA GPU (scripts/gpu_check.py); its missing import is tested
    ("data", "gsm8k"): [f"data.path={GSM8K}"] if GSM8K.is_dir() else None,
    ("reward", "rm"): None,  # a checkpoint trained with algo=rm: built end to end in tests/algorithms/test_rm.py
    ("reward", "rm_uncertain"): None,  # two such checkpoints: tests/test_rewards.py builds two small ones
    ("algo", "madpo"): None,  # the same (its reward model): built end to end in tests/algorithms/test_madpo.py
    ("algo", "smpo"): None,  # the same: tests/algorithms/test_smpo.py
    ("algo", "distill"): None,  # trained teacher checkpoints: built end to end in tests/algorithms/test_distill.py
    ("reward", "length_penalty"): ["algo=grpo"],  # its budget is the RL algorithm's max_new_tokens
    ("reward", "multi"): ["algo=grpo"],  # the same (its length term)
}
CASES = [(g, o) for g in GROUPS for o in group_options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes(group, option):
    # an experiment may switch the model, so SMALL's model keys do not apply to it
    cfg = compose_config("train", [f"{group}={option}"]) if group == "experiment" else small_config(f"{group}={option}")
    TrainerConfig.from_config(cfg.trainer)
    if group == "experiment":  # `# @package _global_`: it sets other groups, it has no node of its own
        assert "experiment" not in cfg and cfg != compose_config("train")
    else:
        assert cfg[group] is not None


# Experiments are built by the runs they configure (they only select options of other groups).
BUILDABLE = [c for c in CASES if NEEDS.get(c, []) is not None and c[0] != "experiment"]


@pytest.mark.parametrize("group,option", BUILDABLE, ids=[f"{g}={o}" for g, o in BUILDABLE])
def test_every_option_builds(group, option, tmp_path: Path):
    cfg = small_config(f"{group}={option}", *NEEDS.get((group, option), []))
    node = cfg[group]
    if group == "hooks":
        obj = {name: build(h) for name, h in node.items()}
    elif group == "logger":
        obj = build(node, run_dir=tmp_path)
        obj.log({"train/loss": 1.0}, step=1)
        obj.finish()
    elif group == "optimizer":
        obj = build(node)([("mlp.up_proj.weight", torch.nn.Parameter(torch.zeros(8, 8)))])  # named, as the loop passes; 8 wide so density 0.25 keeps 2 rows
    elif group == "data":
        obj = build(node)
        assert all(len(obj.split(s)) > 0 for s in ("train", "validation", "test"))
    elif group == "model":
        obj = build(node)
        assert obj.model.config.vocab_size >= len(obj.tokenizer)
    elif group == "regularizer":  # a wrapper: the run builds it around the algorithm
        obj = build(node, algo=build(cfg.algo))
    else:
        obj = build(node)
    assert obj is not None


COMPRESSION = [(c, o) for c, groups in COMMAND_GROUPS.items() for g in groups for o in group_options(g, c)]


@pytest.mark.parametrize("command,option", COMPRESSION, ids=[f"{c}:method={o}" for c, o in COMPRESSION])
def test_every_compression_method_composes_and_builds(command, option):
    # D-Pruner's config declares its open-domain set required; the others' leave it optional
    extra = ["calib.general=shakespeare"] if option == "dpruner" else []
    cfg = compose_config(command, [f"method={option}", *extra])
    require_complete(cfg)
    assert build(cfg.method) is not None


def test_a_method_of_the_other_command_is_hydras_unknown_option():
    for command, other in (("quantize", "prune"), ("prune", "quantize")):
        for option in group_options("method", other):
            with pytest.raises(RlxError, match=f"unknown method option '{option}'"):
                compose_config(command, [f"method={option}"])
