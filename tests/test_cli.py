"""The CLI hand-off to Hydra, a multirun sweep, eval, and one-line errors for bad input."""
import json
import sys

from typer.testing import CliRunner

from rlx.cli import app
from rlx.config import group_options
from tests.support import SMALL

runner = CliRunner()


def rlx(*args: str):
    return runner.invoke(app, list(args))


def test_train_writes_run_files_and_loss_falls(tmp_path):
    argv_before = list(sys.argv)
    res = rlx("train", *SMALL, "trainer.max_steps=30", "trainer.log_every=5", f"hydra.run.dir={tmp_path}")
    assert res.exit_code == 0, res.output
    assert sys.argv == argv_before  # the hand-off restores argv
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert any("eval/accuracy" in r for r in rows)
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    last = tmp_path / "checkpoints" / "last"
    assert (last / "config.json").exists() and (last / "trainer_state.pt").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30


def test_multirun_sweep_runs_one_job_per_value(tmp_path):
    res = rlx("train", "-m", *SMALL, "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != ".hydra") == ["0", "1"]
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "optimizer.lr=0.001" in summary[1]


def test_cfg_job_prints_config_without_training(tmp_path):
    res = rlx("train", "optimizer.lr=0.5", "--cfg", "job")
    assert res.exit_code == 0 and "lr: 0.5" in res.output


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    for bad, needle in [
        ("algo=nope", f"unknown algo option 'nope'; valid: {', '.join(group_options('algo'))}"),
        ("trainer.max_stepz=3", "unknown key 'trainer.max_stepz'"),
        ("trainer.max_steps=abc", "bad trainer.max_steps"),
        ("optimizer=nope,adamw", "unknown optimizer option 'nope'"),
        ("optimizer.lr=abc", "cannot build optimizer torch.optim.AdamW"),
        ("model=hf", "Missing mandatory value: model.name_or_path"),
        ("model.init=/no/such/model", "cannot load model '/no/such/model'"),
        ("trainer.resume=/no/such/run", "checkpoint '/no/such/run' does not exist"),
    ]:
        res = rlx("train", "-m" if "," in bad else "trainer.progress=false", bad, f"hydra.run.dir={tmp_path}")
        assert res.exit_code == 1, bad
        assert res.output.strip().splitlines() == [f"error: {res.output.strip()[7:]}"] and needle in res.output


def test_ls_and_config_show():
    assert "sft" in rlx("ls", "algo").output
    res = rlx("config", "show", "optimizer.lr=3e-4")
    assert res.exit_code == 0 and "lr: 0.0003" in res.output
