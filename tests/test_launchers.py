"""Hydra launchers across jobs (docs/scaling.md): joblib and submitit's local executor run here for
real; the Slurm and Ray presets are composed (their clusters are not ours to run), and a local Ray
sweep runs in the slow suite. The sweep's summary table is collected whatever launched the jobs."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlx.tasks import run_training
from tests.support import SMALL, small_config

SWEEP = ["model=tiny", *SMALL, "trainer.max_steps=3"]


def rlx_train(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "rlx", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def sweep_rows(cwd: Path) -> list[dict]:
    (summary,) = cwd.glob("multirun/*/*/summary.csv")
    return list(csv.DictReader(summary.open()))


def test_joblib_runs_the_jobs_in_parallel_and_collects_the_summary(tmp_path):
    rlx_train(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SWEEP, "seed=0,1")
    rows = sweep_rows(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1"] and rows[0]["train/loss"] != rows[1]["train/loss"]


def test_submitit_tasks_are_the_ranks_of_one_job(tmp_path):
    """hydra/launcher=slurm_ddp's mechanism, on submitit's local executor: a job of 2 tasks under
    trainer.strategy=ddp trains as one process accumulating 2 micro-batches."""
    rlx_train(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
              "trainer.strategy=ddp", *SWEEP, "seed=0")
    (job,) = sweep_rows(tmp_path)
    run_training(small_config("trainer.max_steps=3", "trainer.grad_accum=2"), tmp_path / "one")
    two = load_file(Path(job["run_dir"]) / "checkpoints/last/model.safetensors")
    one = load_file(tmp_path / "one/checkpoints/last/model.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("preset, expect", [
    ("slurm", ["SlurmLauncher", "gpus_per_node: 1", "tasks_per_node: 1"]),
    ("slurm_ddp", ["SlurmLauncher", "gpus_per_node: 8", "tasks_per_node: 8"]),
    ("ray_gpu", ["RayLauncher", "num_gpus: 1"]),
])
def test_cluster_presets_compose(tmp_path, preset, expect):
    done = rlx_train(tmp_path, f"hydra/launcher={preset}", "--cfg", "hydra", "-p", "hydra.launcher")
    for text in expect:
        assert text in done.stdout, done.stdout


def test_multirun_and_cfg_together_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlx", "train", "-m", "--cfg", "hydra"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: -m and --cfg cannot go together")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_ray_runs_a_local_sweep(tmp_path):
    rlx_train(tmp_path, "-m", "hydra/launcher=ray_gpu", "hydra.launcher.ray.remote.num_gpus=0",
              "hydra.launcher.ray.remote.num_cpus=1", "+hydra.launcher.ray.init.num_cpus=2", *SWEEP, "seed=0,1",
              timeout=600)
    assert len(sweep_rows(tmp_path)) == 2
