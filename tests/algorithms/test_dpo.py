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
from tests.support import small_config, straight_and_resumed

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


# The other losses on PAIR (r_c = +1, r_r = -1, h = 2), with ls(x) = log sigma(x):
# ls(1) = -0.313262, ls(-1) = -1.313262, ls(0.5) = -0.474077, ls(-0.5) = -0.974077,
# sigma(1) = 0.731059, sigma(0.5) = 0.622459.


def loss_of(loss_type, beta, pair=PAIR, **kwargs):
    return dpo_loss(*pair, beta=beta, loss_type=loss_type, **kwargs)[0]


def test_hinge_by_hand():
    # max(0, 1 - beta h): beta 0.25 -> 1 - 0.5 = 0.5; beta 0.5 -> max(0, 1 - 1) = 0
    assert loss_of("hinge", 0.25).item() == pytest.approx(0.5)
    assert loss_of("hinge", 0.5).item() == pytest.approx(0.0)


def test_robust_by_hand():
    # beta h = 1, eps 0.1: (0.9 * 0.313262 + 0.1 * ls(-1)) / (1 - 0.2) = (0.281936 - 0.131326) / 0.8 = 0.188262
    assert loss_of("robust", 0.5, label_smoothing=0.1).item() == pytest.approx(0.188262, abs=1e-6)
    # eps 0: plain DPO, -ls(1)
    assert loss_of("robust", 0.5).item() == pytest.approx(0.313262, abs=1e-6)


def test_exo_pair_by_hand():
    # beta h = 1, eps 0.1: sigma(1) (ls(1) - log 0.9) + sigma(-1) (ls(-1) - log 0.1)
    # = 0.731059 * (-0.313262 + 0.105361) + 0.268941 * (-1.313262 + 2.302585) = -0.151988 + 0.266070 = 0.114082
    assert loss_of("exo_pair", 0.5, label_smoothing=0.1).item() == pytest.approx(0.114082, abs=1e-6)


def test_nca_pair_by_hand():
    # beta r_c = 0.5, beta r_r = -0.5: -ls(0.5) - 0.5 ls(-0.5) - 0.5 ls(0.5)
    # = 0.474077 + 0.487039 + 0.237039 = 1.198154
    assert loss_of("nca_pair", 0.5).item() == pytest.approx(1.198154, abs=1e-6)


def test_bco_pair_by_hand():
    # delta 0: -ls(0.5) - ls(-(-0.5)) = 2 * 0.474077 = 0.948154
    assert loss_of("bco_pair", 0.5).item() == pytest.approx(0.948154, abs=1e-6)
    # delta 0.25: -ls(0.5 - 0.25) - ls(-(-0.5 - 0.25)) = -ls(0.25) - ls(0.75) = 0.575941 + 0.386871 = 0.962810
    assert loss_of("bco_pair", 0.5, reward_shift=0.25).item() == pytest.approx(0.962810, abs=1e-6)


def test_sppo_hard_by_hand():
    # (r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2: beta 0.5 -> (1 - 1)^2 + (-1 + 1)^2 = 0;
    # beta 0.25 -> (1 - 2)^2 + (-1 + 2)^2 = 2
    assert loss_of("sppo_hard", 0.5).item() == pytest.approx(0.0)
    assert loss_of("sppo_hard", 0.25).item() == pytest.approx(2.0)


def test_apo_by_hand():
    # zero: 1 - sigma(0.5) + sigma(-0.5) = 1 - 0.622459 + 0.377541 = 0.755081
    assert loss_of("apo_zero", 0.5).item() == pytest.approx(0.755081, abs=1e-6)
    # down: sigma(0.5) + 1 - sigma(1) = 0.622459 + 1 - 0.731059 = 0.891401
    assert loss_of("apo_down", 0.5).item() == pytest.approx(0.891401, abs=1e-6)


def test_discopop_by_hand():
    # z = beta h = 1, tau 1: mix sigma(1) = 0.731059: 0.313262 * 0.268941 + e^-1 * 0.731059 = 0.084249 + 0.268942
    assert loss_of("discopop", 0.5, discopop_tau=1.0).item() == pytest.approx(0.353191, abs=1e-6)
    # tau 0.05: mix sigma(20) ~ 1 - 2e-9, so the exponential part alone: e^-1 = 0.367879
    assert loss_of("discopop", 0.5).item() == pytest.approx(0.367879, abs=1e-6)


def test_sigmoid_norm_by_hand():
    # per-token averages (chosen 2 tokens, rejected 4): r_c = 1 / 2, r_r = -1 / 4, h = 0.75; beta 1: -ls(0.75) = 0.386871
    averaged = (t(-1.0 / 2), t(-3.0 / 4), t(-2.0 / 2), t(-2.0 / 4))
    assert loss_of("sigmoid_norm", 1.0, pair=averaged).item() == pytest.approx(0.386871, abs=1e-6)


# Two pairs where sorting matters: policy margins log pi(y_c) - log pi(y_r) = (2, -1), reference margins (0, 3)
TWO = (t(-1.0, -4.0), t(-3.0, -3.0), t(-2.0, -1.0), t(-2.0, -4.0))


def test_aot_sorts_margins_across_the_batch_by_hand():
    # sorted policy (-1, 2) minus sorted reference (0, 3) = (-1, -1); beta 1: -ls(-1) = 1.313262 each
    assert loss_of("aot", 1.0, pair=TWO).tolist() == pytest.approx([1.313262] * 2, abs=1e-6)
    # unsorted it would be DPO's (2, -4): -ls(2) = 0.126928, -ls(-4) = 4.018150
    assert loss_of("sigmoid", 1.0, pair=TWO).tolist() == pytest.approx([0.126928, 4.018150], abs=1e-6)


def test_aot_unpaired_sorts_each_side_by_hand():
    # r_c = (1, -3), r_r = (-1, 1): sorted (-3, 1) - sorted (-1, 1) = (-2, 0); -ls(-2) = 2.126928, -ls(0) = log 2
    assert loss_of("aot_unpaired", 1.0, pair=TWO).tolist() == pytest.approx([2.126928, math.log(2)], abs=1e-6)


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
        DPO(reference, loss_type="sft")  # TRL's SFT term is RPO's, not a DPO loss here
    with pytest.raises(RlxError, match="label_smoothing applies to"):
        DPO(reference, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(RlxError, match="exo_pair needs"):
        DPO(reference, loss_type="exo_pair")
    with pytest.raises(RlxError, match="bco_pair only"):
        DPO(reference, bco_running_mean=True)
    with pytest.raises(RlxError, match="discopop_tau"):
        DPO(reference, loss_type="discopop", discopop_tau=0.0)
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


def test_bco_running_mean_follows_the_micro_batches():
    algo, state, _ = setup(loss_type="bco_pair", bco_running_mean=True)
    # running average of each call's mean reward (one count per call): 0.3, then (0.3 + (-0.1)) / 2 = 0.1
    assert algo.update_reward_mean(t(0.2, 0.4), t(0.3, 0.3)) == pytest.approx(0.3)
    assert algo.update_reward_mean(t(-0.1), t(-0.1)) == pytest.approx(0.1)
    fresh, _, _ = setup(loss_type="bco_pair", bco_running_mean=True)
    fresh.load_state_dict(algo.state_dict())
    assert (fresh.reward_mean, fresh.reward_updates) == (algo.reward_mean, algo.reward_updates)
    # policy == reference: every reward is 0, so the mean decays as 0.1 * 2/3 after a third call
    _, metrics = algo.loss(algo.make_batch(TASK.split("train")[:2], state), state)
    assert metrics["dpo/reward_shift"] == pytest.approx(0.1 * 2 / 3, abs=1e-6)


@pytest.mark.slow  # six short loop runs (~40 s on 2 cores)
def test_bco_running_mean_resumes_exactly(tmp_path, monkeypatch):
    overrides = ["algo=dpo", "algo.loss_type=bco_pair", "algo.bco_running_mean=true", "data=reasoning_pairs",
                 "data.num_train=32", "data.num_validation=4", "data.num_test=4", "trainer.micro_batch_size=2",
                 "optimizer.lr=1e-2", "trainer.lr_scheduler=constant"]  # constant: the cut run's schedule is the same
    _, _, full_weights, resumed_weights = straight_and_resumed(tmp_path / "kept", overrides)
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)
    # the running mean is what makes it exact: a resume that restarts it from 0 ends elsewhere
    monkeypatch.setattr(DPO, "load_state_dict", lambda self, state: None)
    _, _, full_weights, resumed_weights = straight_and_resumed(tmp_path / "lost", overrides)
    assert not all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)
