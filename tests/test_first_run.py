"""What a new user meets first: RL and preference algorithms start from the SFT base and
preference pairs by default (the user's own model=/data= wins), a random init under RL says so
once, and, from an empty cache, the commands we are known by build the base and do real work."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import rlx.config
from rlx.config import compose_config
from rlx.errors import RlxError
from rlx.paths import CONF_DIR, REPO_ROOT
from rlx.tasks import run_training
from tests.support import small_config

RL = ["grpo", "ppo", "tppo", "dler", "dot", "drpo", "grpo_lambda"]


@pytest.mark.parametrize("algo", [*RL, "dpo", "rm"])
def test_rl_and_preference_algorithms_start_from_the_sft_base(algo):
    cfg = compose_config("train", [f"algo={algo}"])
    assert cfg.model._target_ == "rlx.models.tiny_sft"
    want = "rlx.data.preferences.ReasoningPairs" if algo in ("dpo", "rm") else "rlx.data.reasoning.ReasoningTask"
    assert cfg.data._target_ == want


def test_the_users_model_and_data_win():
    cfg = compose_config("train", ["algo=dpo", "model=tiny", "data=reasoning"])
    assert (cfg.model._target_, cfg.data._target_) == ("rlx.models.tiny", "rlx.data.reasoning.ReasoningTask")
    assert compose_config("train").model._target_ == "rlx.models.tiny"  # SFT trains the tiny model from scratch


@pytest.mark.parametrize("algo,lr,steps", [("tppo", 3e-5, 100), ("grpo", 3e-5, 100), ("dpo", 1e-5, 60), ("rm", 1e-4, 60)])
def test_algorithms_bring_an_lr_that_keeps_the_base_and_yours_win(algo, lr, steps):
    cfg = compose_config("train", [f"algo={algo}"])
    assert (cfg.optimizer.lr, cfg.trainer.max_steps) == (lr, steps)  # not SFT's 3e-3 x 1000 steps
    mine = compose_config("train", [f"algo={algo}", "optimizer.lr=1e-3", "trainer.max_steps=7", "optimizer=frugal"])
    assert (mine.optimizer.lr, mine.trainer.max_steps, mine.optimizer._target_.split(".")[-1]) == (1e-3, 7, "GradientSplitting")
    assert compose_config("train", ["algo=grpo", "experiment=ppo_tiny"]).trainer.micro_batch_size == 64  # recipes last


def test_rl_on_a_random_init_says_so_once(tmp_path, capsys):
    run_training(small_config("algo=grpo", "algo.max_new_tokens=4", "trainer.max_steps=1"), tmp_path / "rl")
    err = capsys.readouterr().err
    assert err.count("is a random init that cannot do the task yet") == 1 and "model=tiny_sft" in err
    run_training(small_config("trainer.max_steps=1"), tmp_path / "sft")
    assert "random init" not in capsys.readouterr().err  # SFT from scratch is pretraining


def test_a_bad_override_inside_a_config_is_one_line(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "algo" / "broken.yaml").write_text("defaults:\n  - override /nope@_global_.nope: x\n\n"
                                               "_target_: rlx.algorithms.sft.SFT\n")
    monkeypatch.setattr(rlx.config, "CONF_DIR", conf)
    with pytest.raises(RlxError, match="Could not override 'nope'"):  # was: recursion without end
        compose_config("train", ["algo=broken"])


@pytest.mark.slow
def test_from_an_empty_cache_the_commands_we_are_known_by_do_real_work(tmp_path):
    """Builds the SFT base (5-10 minutes on 2 CPU cores), then T-PPO, BAQ and DPO start from it."""
    env = {**os.environ, "RLX_CACHE": str(tmp_path / "cache")}
    rlx = [sys.executable, "-m", "rlx"]
    tppo = subprocess.run([*rlx, "train", "algo=tppo", "trainer.max_steps=2", "trainer.eval_samples=64",
                           f"hydra.run.dir={tmp_path / 'tppo'}"], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert tppo.returncode == 0, tppo.stderr[-2000:]
    assert "building it once" in tppo.stderr and "random init" not in tppo.stderr
    baq = subprocess.run([*rlx, "quantize", "method=baq", "bits=3", "eval.samples=64", f"hydra.run.dir={tmp_path / 'baq'}"],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert baq.returncode == 0, baq.stderr[-2000:]
    assert "building it once" not in baq.stderr  # cached by the first command
    dpo = subprocess.run([*rlx, "train", "algo=dpo", "trainer.max_steps=2", "trainer.eval_samples=16",
                          f"hydra.run.dir={tmp_path / 'dpo'}"], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert dpo.returncode == 0, dpo.stderr[-2000:]  # no data= needed: DPO selects the preference pairs
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["dpo/reward_accuracy"] >= 0
    for run in ("tppo", "baq"):  # the trained base (or it quantized to 3 bits), not a random init at 0%
        assert json.loads((tmp_path / run / "summary.json").read_text())["eval/accuracy"] > 0.3, run
