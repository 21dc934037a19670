"""Loop invariants: accumulation equivalence, hook order and no-op hooks, exact resume,
the NaN guard, and corrupt checkpoints."""
import math

import pytest
import torch

from rlx.errors import RlxError
from rlx.tasks import run_training
from tests.support import EVENT_LOG, hook, losses, small_config


def test_micro_batch_times_accumulation_is_invariant(tmp_path):
    runs = {}
    for micro, accum in [(8, 1), (4, 2), (2, 4)]:
        cfg = small_config("trainer.max_steps=4", f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}")
        run_training(cfg, tmp_path / f"{micro}x{accum}")
        runs[micro] = losses(tmp_path / f"{micro}x{accum}")
    assert runs[8] == pytest.approx(runs[4], abs=1e-5) and runs[8] == pytest.approx(runs[2], abs=1e-5)
    assert runs[8][-1] < runs[8][0]  # and it trained


def test_noop_hook_sees_events_in_order_and_changes_nothing(tmp_path):
    EVENT_LOG.clear()
    run_training(small_config("trainer.max_steps=3"), tmp_path / "plain")
    run_training(small_config("trainer.max_steps=3", *hook("rec", "tests.support.Recorder")), tmp_path / "hooked")
    assert losses(tmp_path / "plain") == losses(tmp_path / "hooked")
    step = ["on_step_start", "on_after_backward", "on_before_optimizer_step", "on_step_end"]
    assert EVENT_LOG == ["on_train_start", *step * 3, "on_train_end"]


def test_interrupted_run_resumes_the_same_trajectory(tmp_path):
    common = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=0"]
    run_training(small_config(*common), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(*common, *hook("stop", "tests.support.InterruptAt", step=3)), tmp_path / "cut")
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight")[:3], abs=1e-6)
    run_training(small_config(*common, "trainer.resume=auto"), tmp_path / "cut")
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = small_config("trainer.max_steps=6", "trainer.save_every=2", *hook("nan", "tests.support.PoisonAt", step=3))
    with pytest.raises(RlxError, match="loss is nan at step 4"):
        run_training(cfg, tmp_path)
    last = (tmp_path / "checkpoints" / "last").resolve()
    assert last.name == "step_000002"
    state = torch.load(last / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and all(math.isfinite(x) for x in losses(tmp_path))


@pytest.mark.parametrize("victim", ["trainer_state.pt", "model.safetensors"])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, victim):
    run_training(small_config("trainer.max_steps=2"), tmp_path)
    f = tmp_path / "checkpoints" / "last" / victim
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(RlxError, match="corrupt"):
        run_training(small_config("trainer.max_steps=4", "trainer.resume=auto"), tmp_path)


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(RlxError, match="does not exist"):
        run_training(small_config(f"trainer.resume={tmp_path}/nowhere"), tmp_path)


def test_only_the_newest_checkpoints_are_kept_and_no_temp_is_left(tmp_path):
    run_training(small_config("trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=2"), tmp_path)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_000003", "step_000004"]
    assert (root / "last").resolve().name == "step_000004"


def test_bf16_autocast_trains_on_cpu(tmp_path):
    summary = run_training(small_config("trainer.precision=bf16", "trainer.max_steps=3"), tmp_path)
    assert math.isfinite(summary["train/loss"])
