"""algo=distill: the KL by hand, its limits (student = teachers, ce_weight = 1 is SFT), the synthetic rows,
loop runs from two tiny teachers, exact resume with a synthetic pool, and one-line errors."""
import math
from types import SimpleNamespace

import pytest
import torch

from rlx.algorithms.distill import Distill, distill_terms
from rlx.algorithms.sft import SFT
from rlx.data.collate import IGNORE
from rlx.errors import RlxError
from rlx.models import hf
from rlx.state import find_checkpoint
from rlx.tasks import run_training
from tests.support import losses, small_config, straight_and_resumed

TEACHER = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny teachers (other init seeds), 2 SFT steps each on the reasoning task."""
    root = tmp_path_factory.mktemp("teachers")
    for s in (0, 1):
        run_training(small_config(f"model.seed={s}", f"seed={s}"), root / f"t{s}")
    return [str(root / "t0"), str(root / "t1")]


def test_kl_and_ce_by_hand():
    # student logits [0, ln 3] -> p = [1/4, 3/4]; teacher [0, 0] -> q = [1/2, 1/2]; target token 1
    # KL(q || p) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3) = 0.143841; CE = -ln 3/4 = 0.287682
    student = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    teacher = torch.zeros(1, 2, 2)
    kl, ce, n = distill_terms(student, teacher, torch.tensor([[1, IGNORE]]))  # the second token is masked
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert ce.item() == pytest.approx(-math.log(0.75), abs=1e-6) and n.item() == 1


def batch_of(algo, state, texts=("1 + 2 = 3", "4 + 4 = 8")):
    return algo.make_batch([{"text": t} for t in texts], state)


def student_state(path):
    policy = hf(str(find_checkpoint(path)), device="cpu", dtype="float32")
    return SimpleNamespace(model=policy.model, tokenizer=policy.tokenizer, task=None)


def test_student_equal_to_its_teachers_has_zero_loss_and_gradient(teachers):
    state = student_state(teachers[0])
    algo = Distill([teachers[0], teachers[0]])  # an ensemble of two copies of the student
    loss, metrics = algo.loss(batch_of(algo, state), state)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and metrics["distill/kl"].abs() < 1e-6
    assert max(p.grad.abs().max().item() for p in state.model.parameters()) < 1e-6


def test_ce_weight_one_is_plain_sft(teachers):
    state = student_state(teachers[0])
    algo = Distill(teachers, ce_weight=1.0)
    b = batch_of(algo, state)
    assert algo.loss(b, state)[0].item() == pytest.approx(SFT().loss(b, state)[0].item(), abs=1e-6)
    # against another student, the KL term is not zero: ce_weight 0 gives a different, positive loss
    other = Distill(teachers, ce_weight=0.0).loss(b, state)[0].item()
    assert other > 1e-4 and other != pytest.approx(SFT().loss(b, state)[0].item(), abs=1e-3)


def test_synthetic_rows_are_a_fraction_of_the_batch_and_cycle_the_pool(teachers):
    state = student_state(teachers[1])
    state.task = SimpleNamespace(split=lambda name: [{"text": "12 + 3"}, {"text": "7 + 7"}])
    algo = Distill(teachers, max_length=12, synthetic_fraction=0.5, synthetic_samples=3, ce_weight=1.0)
    b = batch_of(algo, state, ("1 + 1", "2 + 2"))
    assert b["input_ids"].shape == (4, 12)  # 2 real rows + 2 sampled rows of max_length tokens
    assert (b["labels"][2:] != IGNORE).all()  # every sampled token is a target
    tok = state.tokenizer
    assert b["input_ids"][2:, 0].tolist() == [tok("1")["input_ids"][-1], tok("7")["input_ids"][-1]]  # starts
    b2 = batch_of(algo, state, ("1 + 1", "2 + 2"))  # pool rows 2, 0: in order, cycling
    assert torch.equal(b2["input_ids"][2], algo.pool[2]) and torch.equal(b2["input_ids"][3], algo.pool[0])
    assert algo.state_dict()["drawn"] == 4


def test_loop_run_from_two_teachers(teachers, tmp_path):
    over = [*TEACHER, "algo=distill", f"algo.teachers=[{teachers[0]},{teachers[1]}]", "trainer.max_steps=3"]
    summary = run_training(small_config(*over), tmp_path)
    assert summary["steps"] == 3 and math.isfinite(summary["train/loss"]) and summary["distill/kl"] > 0
    assert summary["distill/teacher_ce"] > 0 and len(losses(tmp_path)) == 3


def test_resume_is_exact_with_a_synthetic_pool(teachers, tmp_path):
    over = [*TEACHER, "algo=distill", f"algo.teachers=[{teachers[0]},{teachers[1]}]", "algo.max_length=24",
            "algo.synthetic_fraction=0.5", "algo.synthetic_samples=6", "algo.ce_weight=0.5",
            "trainer.lr_scheduler=constant"]
    full, resumed, w_full, w_cut = straight_and_resumed(tmp_path, over)
    assert full["train/loss"] == resumed["train/loss"]
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


@pytest.mark.parametrize("kwargs,message", [
    ({"teachers": []}, "must be a list"),
    ({"teachers": "outputs/a"}, "must be a list"),
    ({"ce_weight": 1.5}, r"ce_weight=1.5 must be in \[0, 1\]"),
    ({"synthetic_fraction": 1.0}, r"synthetic_fraction=1.0 must be in \[0, 1\)"),
])
def test_bad_settings_are_one_line(teachers, kwargs, message):
    with pytest.raises(RlxError, match=message) as e:
        Distill(**{"teachers": teachers, **kwargs})
    assert "\n" not in str(e.value)


def test_a_missing_teacher_is_one_line(tmp_path):
    cfg = small_config("algo=distill", f"algo.teachers=[{tmp_path / 'gone'}]")
    with pytest.raises(RlxError, match=r"^algo.teachers: checkpoint .*gone' does not exist$"):
        run_training(cfg, tmp_path / "run")
