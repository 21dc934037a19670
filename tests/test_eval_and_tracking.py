"""`rlx eval` on a training checkpoint, and the wandb logger's offline run."""
import json

from typer.testing import CliRunner

from rlx.cli import app
from rlx.tasks import run_training
from tests.support import small_config

runner = CliRunner()


def test_eval_reads_a_checkpoint_and_its_data_config(tmp_path):
    run_training(small_config(), tmp_path)
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", f"checkpoint={tmp_path}/checkpoints/last", "num_samples=4",
                              "max_new_tokens=8", f"out={out}"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    assert metrics["split"] == "test" and metrics["data"] == "rlx.data.reasoning.ReasoningTask"
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/perplexity"] > 1.0


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    res = runner.invoke(app, ["eval", f"checkpoint={tmp_path}/nothing"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "does not exist" in res.output


def test_wandb_logger_writes_an_offline_run_that_wandb_sync_can_upload(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_training(small_config("logger=wandb"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "metrics.jsonl").read_text().count("train/loss") == 2


def test_plot_draws_the_curves_of_several_runs(tmp_path):
    for name, losses in [("a", [3.0, 2.0]), ("b", [3.0, 1.0])]:
        (tmp_path / name).mkdir()
        rows = [{"step": i + 1, "train/loss": v} for i, v in enumerate(losses)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    res = runner.invoke(app, ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["plot", str(tmp_path / "a"), "--keys", "eval/nothing"])
    assert res.exit_code == 1 and "they have: train/loss" in res.output
