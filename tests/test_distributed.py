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


# ECO's codes (stochastic rounding: its own RNG) and FRUGAL's projectors must stay the same on every
# rank, or the ranks' weights drift apart and the run stops matching the one-process run.
HOOKS = {"eco": ["quantizer=eco", "quantizer.rounding=stochastic"], "frugal": ["optimizer=frugal"]}


@pytest.mark.parametrize("algo", [[], GRPO, *HOOKS.values()], ids=["sft", "grpo", *HOOKS])
def test_two_ranks_equal_one_process_accumulating_two(tmp_path, algo):
    one = run_training(small_config(*STEPS, *algo, "trainer.grad_accum=2"), tmp_path / "one")
    torchrun(tmp_path, [*STEPS, *algo, "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'two'}"])
    assert_same_run(tmp_path / "one", tmp_path / "two")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["train/tokens"] == one["train/tokens"]  # counted over both ranks
    if algo == GRPO:  # the rollout's metrics are the whole batch's, not rank 0's half
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


@pytest.mark.slow  # three torchrun launches, a minute
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


@pytest.mark.slow  # three torchrun launches, a minute
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


# ---------------------------------------------------------------------------- batch statistics over ranks


def _on_ranks(rank: int, world: int, init: str, fn, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def on_two_ranks(tmp_path, fn) -> list:
    """fn(rank, world) run on 2 gloo processes; what each returned, in rank order."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_on_ranks, args=(2, f"file://{tmp_path / 'rendezvous'}", fn, out), nprocs=2)
    return [torch.load(f"{out}.{r}") for r in range(2)]


REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.3, 0.9, 0.2, 0.2, 0.0, 0.0, 0.0, 1.0])
LENGTHS = torch.tensor([5, 9, 12, 3, 7, 7, 30, 4, 2, 8, 15, 6, 11, 1, 9, 20])
CORRECT = (REWARDS > 0.5).float()


def _advantages_of_my_half(rank, world):
    from rlx.algorithms._rl import group_advantages
    from rlx.distributed import batch_concat

    half = slice(8 * rank, 8 * rank + 8)  # two groups of 4 on each rank
    return {scale: group_advantages(REWARDS[half], 4, scale=scale, lengths=LENGTHS[half], gather=batch_concat)
            for scale in ("batch", "batch_tokens", "group")}


def test_batch_statistics_span_the_ranks(tmp_path):
    from rlx.algorithms._rl import group_advantages

    ranks = on_two_ranks(tmp_path, _advantages_of_my_half)
    for scale in ("batch", "batch_tokens", "group"):
        whole = group_advantages(REWARDS, 4, scale=scale, lengths=LENGTHS)
        torch.testing.assert_close(torch.cat([r[scale] for r in ranks]), whole, msg=scale)
    # the ranks' own halves alone would give other values: the gather is what makes them equal
    alone = group_advantages(REWARDS[:8], 4, scale="batch")
    assert not torch.allclose(alone, group_advantages(REWARDS, 4, scale="batch")[:8])


def _selection_of_my_half(rank, world):
    from rlx.algorithms.grpo_lambda import GRPOLambda
    from rlx.rewards import WeightedSum
    from tests.support import Constant

    algo = GRPOLambda(WeightedSum({"r": Constant()}, {"r": 1.0}), group_size=4, fraction=0.5)
    half = slice(8 * rank, 8 * rank + 8)
    return algo.shaped_rewards(REWARDS[half], CORRECT[half], LENGTHS[half].float())


def test_grpo_lambda_selects_over_all_ranks(tmp_path):
    from rlx.algorithms.grpo_lambda import GRPOLambda
    from rlx.rewards import WeightedSum
    from tests.support import Constant

    algo = GRPOLambda(WeightedSum({"r": Constant()}, {"r": 1.0}), group_size=4, fraction=0.5)
    rewards, chosen = algo.shaped_rewards(REWARDS, CORRECT, LENGTHS.float())
    ranks = on_two_ranks(tmp_path, _selection_of_my_half)
    torch.testing.assert_close(torch.cat([r[0] for r in ranks]), rewards)
    assert torch.cat([r[1] for r in ranks]).tolist() == chosen.tolist()
    assert [r[1].sum().item() for r in ranks] != [1, 1]  # not each rank's own top half


def test_a_killed_rank_ends_the_run_and_the_last_checkpoint_holds(tmp_path):
    import signal
    import time

    import psutil

    from rlx.state import STATE_FILE, find_checkpoint

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rlx", "train",
           "model=tiny", *SMALL, "trainer.strategy=ddp", "trainer.max_steps=100000", "trainer.save_every=3",
           f"hydra.run.dir={run}"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last").exists() and time.time() < deadline:
            time.sleep(0.5)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if str(run) in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err  # torchrun names the rank that died
    last = find_checkpoint(run)
    assert (last / STATE_FILE).is_file() and torch.load(last / STATE_FILE, weights_only=False)["step"] % 3 == 0
    assert load_file(last / "model.safetensors")
