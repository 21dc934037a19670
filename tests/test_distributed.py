"""Data parallelism under torchrun (rlx/distributed.py), on CPU with the gloo backend.

The property that matters: N ranks at micro-batch b train exactly as one process with
gradient accumulation N at micro-batch b (same losses, same weights), because the ranks deal
the micro-batches of the one stream round-robin, weigh them by the global target count, and
seed each micro-batch's sampling by its global index."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlx.distributed import Parallel
from rlx.errors import RlxError
from rlx.tasks import run_training
from tests.support import SMALL, losses, small_config

STEPS = ["trainer.max_steps=3", "trainer.micro_batch_size=4"]
GRPO = ["algo=grpo", "reward=length_penalty", "algo.group_size=4", "algo.max_new_tokens=12", "optimizer.lr=3e-3"]


def torchrun(cwd: Path, overrides: list[str], nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m rlx train` with the small config and `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rlx", "train", "model=tiny", *SMALL, *overrides]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def assert_same_run(a: Path, b: Path, tol: float = 1e-6) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and la, (la, lb)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=tol, atol=tol)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("algo", [[], GRPO], ids=["sft", "grpo"])
def test_two_ranks_equal_one_process_accumulating_two(tmp_path, algo):
    one = run_training(small_config(*STEPS, *algo, "trainer.grad_accum=2"), tmp_path / "one")
    torchrun(tmp_path, [*STEPS, *algo, "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'two'}"])
    assert_same_run(tmp_path / "one", tmp_path / "two")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["train/tokens"] == one["train/tokens"]  # counted over both ranks
    if algo:  # the rollout's metrics are the whole batch's, not rank 0's half
        assert two["rl/response_len"] == pytest.approx(one["rl/response_len"], abs=1e-6)


def test_the_weights_move(tmp_path):
    """The equivalence above is not two runs that both stood still."""
    run_training(small_config(*STEPS, *GRPO), tmp_path / "run")
    init = small_config(*STEPS, *GRPO)
    from rlx.config import build

    before = build(init.model).model.state_dict()
    after = weights(tmp_path / "run")
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3


def test_one_run_folder_written_by_rank_zero(tmp_path):
    torchrun(tmp_path, [*STEPS, "trainer.strategy=ddp", "trainer.save_every=2"])
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # both ranks wrote to rank 0's folder, not one each
    run = runs[0]
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "metrics.jsonl", "summary.json",
                                                     "train.log"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # one writer
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step_000002", "step_000003"]


def test_resume_under_ddp_is_exact(tmp_path):
    over = [*GRPO, "trainer.strategy=ddp", "trainer.save_every=2", "trainer.micro_batch_size=4",
            "trainer.lr_scheduler=constant"]  # one schedule for the 2- and the 4-step run
    torchrun(tmp_path, [*over, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'full'}"])
    torchrun(tmp_path, [*over, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'cut'}"])
    torchrun(tmp_path, [*over, "trainer.max_steps=4", "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'cut'}"])
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_ddp_needs_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RlxError, match="runs under torchrun"):
        Parallel.start("ddp")


def test_single_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RlxError, match="add trainer.strategy=ddp"):
        Parallel.start("single")


def test_bad_strategy_is_one_line(tmp_path):
    with pytest.raises(RlxError, match="unknown trainer.strategy='dp'"):
        run_training(small_config("trainer.strategy=dp"), tmp_path)


def test_multirun_under_torchrun_is_one_clear_line(tmp_path):
    done = torchrun(tmp_path, ["-m", "trainer.strategy=ddp", "seed=0,1"], check=False)
    assert done.returncode != 0
    assert "error: rlx train -m under torchrun" in done.stderr
    # torchrun adds its own report of a failed worker; the workers themselves print no traceback
    assert not [line for line in done.stderr.splitlines() if line.strip().startswith("File") and "/rlx/" in line]


def test_fsdp2_equals_one_process_accumulating_two(tmp_path):
    run_training(small_config(*STEPS, "trainer.grad_accum=2"), tmp_path / "one")
    torchrun(tmp_path, [*STEPS, "trainer.strategy=fsdp2", f"hydra.run.dir={tmp_path / 'two'}"])
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # the optimizer state is sharded: one file per rank, written by torch.distributed.checkpoint
    shards = sorted(p.name for p in (tmp_path / "two/checkpoints/last/optimizer").glob("*.distcp"))
    assert len(shards) == 2


def test_fsdp2_resumes_exactly(tmp_path):
    over = ["trainer.strategy=fsdp2", "trainer.save_every=2", "trainer.micro_batch_size=4", "trainer.lr_scheduler=constant"]
    torchrun(tmp_path, [*over, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'full'}"])
    torchrun(tmp_path, [*over, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'cut'}"])
    torchrun(tmp_path, [*over, "trainer.max_steps=4", "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'cut'}"])
    assert losses(tmp_path / "full")[2:] == losses(tmp_path / "cut")[2:]
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("override, match", [
    ("optimizer=frugal", "works on whole weight matrices"),
    ("quantizer=eco", "transforms whole weights"),
    ("algo=ppo", "trains parameters beside the policy"),
])
def test_fsdp2_refuses_what_needs_whole_weights(override, match):
    from rlx.config import build
    from rlx.distributed import check_shardable
    from rlx.hooks import Hook

    cfg = small_config(override)
    model = build(cfg.model).model
    optimizer = build(cfg.optimizer)([{"params": list(model.named_parameters())}])
    algo = build(cfg.algo) if override.startswith("algo") else None
    hooks = {"quantizer": build(cfg.quantizer) if override.startswith("quantizer") else Hook()}
    with pytest.raises(RlxError, match=match):
        check_shardable(optimizer, hooks, algo.param_groups() if algo else [], "PPO")
