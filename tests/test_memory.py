"""The memory report: held bytes per parameter group, and the peak of a step on a CPU."""
import os

import pytest
import torch

from rlx.memory import MB, StepPeak, memory_report


def model_and_adamw():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    return model, opt


def test_state_is_reported_per_group():
    model, opt = model_and_adamw()
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    report = memory_report(model, opt)
    assert report["optimizer_MB/group0"] == pytest.approx(2 * (256 * 256 + 256) * 4 / MB)  # exp_avg + exp_avg_sq
    assert report["optimizer_MB/group1"] == pytest.approx(2 * (256 * 4 + 4) * 4 / MB)
    assert report["optimizer_MB"] == pytest.approx(report["optimizer_MB/group0"] + report["optimizer_MB/group1"])


def test_step_peak_sees_a_transient_allocation_and_keeps_other_stderr(capfd):
    model, opt = model_and_adamw()
    peak = StepPeak(model, opt)
    peak.start()
    scratch = torch.ones(4 * 2**20 // 4)  # 4 MB, freed before the step ends
    os.write(2, b"a line of the step's own\n")
    del scratch
    measured = peak.stop()
    assert measured >= memory_report(model, opt)["held_MB"] + 4
    err = capfd.readouterr().err
    assert "a line of the step's own" in err and "profiler_start" not in err and "SyncActivity" not in err


def test_close_stops_a_profiler_left_running():
    model, opt = model_and_adamw()
    peak = StepPeak(model, opt)
    peak.start()
    peak.close()  # as the loop does when a step raises
    assert peak.profiler is None
    peak.close()  # and again is harmless


def test_tensors_a_hook_holds_are_counted_once():
    model, opt = model_and_adamw()
    own = torch.zeros(1024)  # 4 KB a hook keeps outside the model and the optimizer
    report = memory_report(model, opt, [own, own, model[0].weight])  # a model weight is not counted twice
    assert report["hooks_MB"] == pytest.approx(4096 / MB)
    assert report["held_MB"] == pytest.approx(report["weights_MB"] + report["optimizer_MB"] + report["hooks_MB"])
