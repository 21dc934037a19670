"""DPO's loss against hand-computed values, and on the tiny model: a frozen, cached reference,
a step that raises the chosen-vs-rejected margin, and a run of the loop end to end."""
import copy
import json
import math

import pytest
import torch

from rlx.algorithms.dpo import DPO, dpo_loss
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------------------- pure loss

# One pair: policy (chosen, rejected) = (-1, -3), reference (-2, -2), so the chosen log-ratio is
# +1, the rejected one -1, and h = 1 - (-1) = 2.
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def test_sigmoid_loss_by_hand():
    losses, chosen, rejected = dpo_loss(*PAIR, beta=0.5)
    # beta * h = 1: -log sigma(1) = log(1 + e^-1) = 0.313262
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    # rewards are beta * log-ratio: 0.5 * 1 and 0.5 * -1
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_zero_margin_gives_log_2():
    # h = 0: -log sigma(0) = -log(1/2) = log 2, whatever beta
    losses, chosen, rejected = dpo_loss(t(-4.0, -1.0), t(-7.0, -2.0), t(-4.0, -1.0), t(-7.0, -2.0), beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert chosen.tolist() == [0.0, 0.0] and rejected.tolist() == [0.0, 0.0]


def test_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sigma(1) + 0.1 * -log sigma(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    assert losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e), abs=1e-6)
    assert losses.item() == pytest.approx(0.413262, abs=1e-6)


def test_ipo_by_hand():
    # (h - 1 / (2 beta))^2: beta 0.5 -> (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0; beta 1 -> 1.5^2 = 2.25
    assert dpo_loss(*PAIR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(*PAIR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)
    assert dpo_loss(*PAIR, beta=1.0, loss_type="ipo")[0].item() == pytest.approx(2.25)


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
    dpo_loss(chosen, rejected, t(-2.0), t(-2.0), beta=0.5)[0].sum().backward()
    # d/dh -log sigma(beta h) = -beta sigma(-beta h) = -0.5 * sigma(-1) = -0.134471
    assert chosen.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.5 / (1 + math.e), abs=1e-6)


def test_bad_settings_are_clear_errors():
    with pytest.raises(RlxError, match=r"algo.reference='\$\{model\}'"):
        DPO(None)
    reference = tiny(**SMALL, device="cpu")
    with pytest.raises(RlxError, match="loss_type"):
        DPO(reference, loss_type="hinge")
    with pytest.raises(RlxError, match="sigmoid only"):
        DPO(reference, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(RlxError, match="beta"):
        DPO(reference, beta=0.0)


# ---------------------------------------------------------------------------- tiny model


def setup(lr: float = 0.1, **kwargs):
    policy = tiny(**SMALL, device="cpu")
    reference = tiny(**SMALL, device="cpu")  # same seed as the policy: same weights
    opt = torch.optim.SGD(policy.model.parameters(), lr=lr)
    state = TrainState(policy.model, policy.tokenizer, opt, None, TASK)
    return DPO(reference, **kwargs), state, reference


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    algo, state, _ = setup()
    batch = algo.make_batch(TASK.split("train")[:4], state)
    loss, metrics = algo.loss(batch, state)
    assert batch["num_targets"] == 4 and batch["input_ids"].shape[0] == 8  # 4 chosen + 4 rejected rows
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["dpo/chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["dpo/rejected_reward"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_ipo_with_policy_equal_to_reference():
    algo, state, _ = setup(beta=0.1, loss_type="ipo")
    loss, _ = algo.loss(algo.make_batch(TASK.split("train")[:4], state), state)
    # h = 0: (0 - 1 / (2 * 0.1))^2 = 25
    assert loss.item() == pytest.approx(25.0, abs=1e-3)


def test_steps_change_the_policy_raise_the_margin_and_keep_the_reference():
    algo, state, reference = setup(lr=0.5)
    before = copy.deepcopy(state.model.state_dict())
    ref_before = copy.deepcopy(reference.model.state_dict())
    batch = algo.make_batch(TASK.split("train")[:4], state)
    for _ in range(5):
        state.optimizer.zero_grad()
        loss, _ = algo.loss(batch, state)
        loss.backward()
        state.optimizer.step()
    with torch.no_grad():
        after_loss, metrics = algo.loss(batch, state)
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in reference.model.state_dict().items())
    assert all(not p.requires_grad for p in reference.model.parameters())
    assert metrics["dpo/reward_margin"] > 0 and after_loss.item() < math.log(2)


def test_reference_log_probs_are_computed_once_per_pair():
    algo, state, reference = setup()
    calls = []
    reference.model.register_forward_hook(lambda module, args, out: calls.append(1))
    examples = TASK.split("train")
    first = algo.make_batch(examples[:4], state)
    again = algo.make_batch(examples[:4], state)  # a second epoch over the same pairs
    assert len(calls) == 1 and len(algo.pairs.cache) == 4
    assert torch.equal(first["ref_chosen_logps"], again["ref_chosen_logps"])
    algo.make_batch(examples[2:6], state)  # two cached, two new: one forward for the new ones
    assert len(calls) == 2 and len(algo.pairs.cache) == 6


def test_dpo_runs_in_the_loop(tmp_path):
    cfg = small_config("algo=dpo", "data=reasoning_pairs", "data.num_train=32", "data.num_validation=4",
                       "data.num_test=4", "trainer.max_steps=2", "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "dpo/reward_margin", "dpo/reward_accuracy", "dpo/chosen_reward"} <= set(rows[0])
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1


def test_dpo_on_data_without_pairs_is_one_clear_error(tmp_path):
    with pytest.raises(RlxError, match="add data=reasoning_pairs"):
        run_training(small_config("algo=dpo", "data=reasoning", "trainer.max_steps=1"), tmp_path)  # yours wins
