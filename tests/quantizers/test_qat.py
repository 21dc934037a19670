"""QAT phases: the compute-optimal law's worked values, the switch at exactly the planned step,
the disabled limiting case, the LR phases and an export whose weights lie on the grid."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlx.quantizers.qat import lr_multiplier, qat_fraction, switch_step
from rlx.tasks import run_training
from tests.support import FAKE_QUANT_STATES, hook, losses, small_config

PROBE = hook("probe", "tests.support.RecordFakeQuant")


def fraction_at(s: float) -> float:
    return qat_fraction(s * 1 * 4 / 8, params=1, bits=4)[1]


def test_compute_optimal_fraction_worked_values():
    assert fraction_at(1000) == pytest.approx(0.3775, abs=5e-5)
    assert fraction_at(10) == pytest.approx(0.0538, abs=5e-5)
    assert [round(fraction_at(s), 3) for s in (40, 100, 1e4, 1e5)] == [0.161, 0.232, 0.482, 0.557]
    values = [fraction_at(s) for s in (2, 10, 1e2, 1e4, 1e8, 1e300)]
    assert values == sorted(values) and values[-1] > 0.97  # -> 1 as S -> infinity
    # halving the bits at fixed N and D doubles S and lengthens QAT
    assert qat_fraction(1e9, 1e6, 4)[1] > qat_fraction(1e9, 1e6, 8)[1]
    assert switch_step(10_000, fraction_at(40)) == 8387


def test_lr_phases_by_hand():
    # 10 steps, switch at 6: fused stays at the peak until QAT, then decays 4/4, 3/4, 2/4, 1/4
    fused = [lr_multiplier(s, 6, 10, True, None) for s in range(10)]
    assert fused == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]
    # unfused with a 50% FP cooldown: the FP phase decays over its last 3 steps, QAT decays again
    standard = [lr_multiplier(s, 6, 10, False, 0.5) for s in range(10)]
    assert standard == [1, 1, 1, 1, 2 / 3, 1 / 3, 1.0, 0.75, 0.5, 0.25]


def test_switch_happens_at_the_planned_step(tmp_path):
    cfg = small_config("quantizer=qat", "quantizer.tokens=2e5", "trainer.max_steps=6", *PROBE)
    summary = run_training(cfg, tmp_path)
    params = summary["params_M"] * 1e6
    expected = switch_step(6, qat_fraction(2e5, round(params), 4)[1])
    assert 0 < expected < 6
    assert [on for _, _, on in FAKE_QUANT_STATES] == [s >= expected for s in range(6)]
    assert summary["qat/switch_step"] == expected


def test_measured_tokens_plan_the_switch_after_the_first_step(tmp_path):
    summary = run_training(small_config("quantizer=qat", "trainer.max_steps=8", *PROBE), tmp_path)
    tokens_after_step_1 = FAKE_QUANT_STATES[1][1]
    s, f = qat_fraction(tokens_after_step_1 * 8, round(summary["params_M"] * 1e6), 4)
    assert summary["qat/planned_tokens"] == tokens_after_step_1 * 8
    assert summary["qat/fraction"] == pytest.approx(f)
    planned = max(switch_step(8, f), 1)
    assert summary["qat/planned_switch_step"] == planned
    assert [on for _, _, on in FAKE_QUANT_STATES] == [s >= planned for s in range(8)]


def test_disabled_qat_is_the_plain_run(tmp_path):
    run_training(small_config("quantizer=qat", "quantizer.enabled=false", "trainer.max_steps=4"), tmp_path / "off")
    run_training(small_config("trainer.max_steps=4"), tmp_path / "none")
    assert losses(tmp_path / "off") == losses(tmp_path / "none")
    a, b = (load_file(tmp_path / r / "checkpoints/last/model.safetensors") for r in ("off", "none"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qat_changes_the_run_after_the_switch_only(tmp_path):
    run_training(small_config("quantizer=qat", "quantizer.start=2", "trainer.max_steps=4"), tmp_path / "qat")
    run_training(small_config("trainer.max_steps=4"), tmp_path / "none")
    qat, none = losses(tmp_path / "qat"), losses(tmp_path / "none")
    assert qat[:2] == none[:2] and qat[2] != none[2]


@pytest.mark.parametrize("bits", [4, 2])
def test_export_lies_on_the_grid_and_loads_in_transformers(bits, tmp_path):
    run_training(small_config("quantizer=qat", "quantizer.start=0", f"quantizer.bits={bits}",
                              "quantizer.group_size=16", "model.hidden_size=32"), tmp_path)
    out = tmp_path / "quantized"
    meta = json.loads((out / "quantization.json").read_text())
    weights, codes = load_file(out / "model.safetensors"), load_file(out / "quantization.safetensors")
    assert meta["bits"] == bits and meta["layers"]
    for name in meta["layers"]:
        c, s = codes[f"{name}.codes"], codes[f"{name}.scales"]
        w = weights[f"{name}.weight"]
        assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
        assert torch.equal((c.float().reshape(w.shape[0], -1, 16) * s[..., None]).reshape(w.shape), w)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()[f"{meta['layers'][0]}.weight"], weights[f"{meta['layers'][0]}.weight"])


def test_fused_cooldown_decays_the_lr_during_qat(tmp_path):
    run_training(small_config("quantizer=qat", "quantizer.start=2", "quantizer.fuse_cooldown=true",
                              "trainer.lr_scheduler=constant", "trainer.max_steps=4"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    peak = lrs[0]
    assert lrs == pytest.approx([peak, peak, peak, peak / 2])


def test_bad_values_fail_in_one_line(tmp_path):
    from rlx.config import build
    from rlx.errors import RlxError

    for bad in ("quantizer.bits=12", "quantizer.start=-1"):
        with pytest.raises(RlxError):
            build(small_config("quantizer=qat", bad).quantizer)
    # the trainer's schedule is checked when the run starts, before the first step
    with pytest.raises(RlxError, match="trainer.lr_scheduler=constant_with_warmup"):
        run_training(small_config("quantizer=qat", "quantizer.fuse_cooldown=true"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_across_the_switch_is_exact(tmp_path):
    over = ["quantizer=qat", "trainer.lr_scheduler=constant", "trainer.save_every=2", "trainer.max_steps=5"]
    run_training(small_config(*over, "quantizer.tokens=2e5"), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(*over, "quantizer.tokens=2e5", *hook("stop", "tests.support.InterruptAt", step=3)),
                     tmp_path / "cut")
    # the resumed run is told nothing of the plan: the switch step comes from the checkpoint
    run_training(small_config(*over, "quantizer.start=0", "trainer.resume=auto"), tmp_path / "cut")
    assert losses(tmp_path / "full")[2:] == losses(tmp_path / "cut")[-3:]
    a, b = (load_file(tmp_path / r / "checkpoints/last/model.safetensors") for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
