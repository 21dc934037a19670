"""T-PPO: Extended GAE by hand, PPO again when one window holds the whole budget, the policy and
value masks across windows, windowed greedy generation equal to one-shot generation, a pool that
stays full while every response finishes once, one real step, a run in the loop, and an
interrupted run that resumes exactly."""
import copy
import io
import json
from collections import Counter

import pytest
import torch

from rlx.algorithms._rl import gae, masked_mean
from rlx.algorithms.ppo import PPO
from rlx.algorithms.tppo import TPPO, extended_gae
from rlx.data.collate import prompt_batch
from rlx.data.reasoning import ReasoningTask
from rlx.data.stream import ExampleStream, NextBatch
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.rollout import sample
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import Alternating, hook, losses, small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=64, num_validation=2, num_test=2)


def test_extended_gae_by_hand():
    values = torch.tensor([[0.5, 0.6, 0.8, 0.0], [0.5, 0.6, 0.8, 0.0]])  # a padded last column: l = 3
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    finished = torch.tensor([False, True])
    adv, _ = extended_gae(rewards, values, mask, finished, gamma=1.0, lam=0.9)
    # unfinished, V(s_3) := V(s_2) = 0.8: delta = [0.1, 0.2, 0.0]; A_2 = 0, A_1 = 0.2, A_0 = 0.1 + 0.9 * 0.2
    # finished with reward 1, V(s_3) = 0: delta = [0.1, 0.2, 0.2]; A_2 = 0.2, A_1 = 0.38, A_0 = 0.1 + 0.9 * 0.38
    assert torch.allclose(adv, torch.tensor([[0.28, 0.20, 0.0, 0.0], [0.442, 0.38, 0.20, 0.0]]))
    adv, _ = extended_gae(rewards, values, mask, finished, gamma=1.0, lam=1.0)
    assert adv[:, 0].tolist() == pytest.approx([0.8 - 0.5, 1.0 - 0.5])  # lam = 1 telescopes to V(s_2) or r, minus V(s_0)
    assert torch.equal(adv[1], gae(rewards, values, mask, 1.0, 1.0)[0][1])  # finished rows are plain GAE


def make_policy(eos_bias: float = 0.0, scramble: bool = False):
    """The tiny model, its weights redrawn at std 1 if `scramble` (its greedy text then depends on
    the context, where the plain one repeats one character), with EOS favoured by `eos_bias`."""
    policy = tiny(**SMALL, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters() if scramble else []:
            p.copy_(torch.randn(p.shape, generator=g))
    bias = torch.zeros(policy.model.config.vocab_size)
    bias[policy.tokenizer.eos_token_id] = eos_bias
    policy.model.lm_head.bias = torch.nn.Parameter(bias)
    return policy


def setup(policy, reward=None, micro_batch: int = 2, **kwargs):
    algo = TPPO(WeightedSum({"r": reward or Alternating()}, {"r": 1.0}), critic=tiny(**SMALL, device="cpu"),
                **{"max_new_tokens": 8, "window": 3, **kwargs})
    opt = torch.optim.SGD([{"params": list(policy.model.named_parameters())}, *algo.param_groups()], lr=0.1)
    state = TrainState(policy.model, policy.tokenizer, opt, None, TASK)
    stream = ExampleStream(TASK.split("train"), micro_batch, seed=0)
    torch.manual_seed(0)  # the sampler draws from the global generator
    return algo, state, stream


def window(algo, state, stream) -> dict:
    return algo.make_batch(NextBatch(stream), state)  # as the loop calls it


def test_one_window_holding_the_whole_budget_is_ppo():
    """window >= max_new_tokens: every response finishes in its first window, some at EOS, some at the cap."""
    policy, reward = make_policy(eos_bias=3.0), WeightedSum({"r": Alternating()}, {"r": 1.0})
    kw = {"max_new_tokens": 8, "samples_per_prompt": 4, "eps_high": 0.28, "lam": 0.95, "epochs": 1, "minibatches": 2}
    ppo, tppo = PPO(reward, critic=tiny(**SMALL, device="cpu"), **kw), TPPO(
        reward, critic=tiny(**SMALL, device="cpu"), window=8, critic_lam=0.95, **kw)
    torch.nn.init.normal_(ppo.critic.head.weight, std=0.1, generator=torch.Generator().manual_seed(0))  # V != 0
    tppo.critic.load_state_dict(ppo.critic.state_dict())
    state = TrainState(policy.model, policy.tokenizer, None, None, TASK)
    batches = {}
    for algo in (ppo, tppo):
        torch.manual_seed(0)
        batches[algo] = [algo.make_batch(TASK.split("train")[:2], state) for _ in range(2)]
    for p, t in zip(batches[ppo], batches[tppo]):
        for key in ("input_ids", "attention_mask", "old_logprobs", "old_values", "advantages", "returns"):
            assert torch.equal(p[key], t[key]), key
        assert torch.equal(t["policy_mask"], p["response_mask"]) and torch.equal(t["value_mask"], p["response_mask"])
        assert p["num_targets"] == t["num_targets"]
        (p_loss, p_metrics), (t_loss, t_metrics) = ppo.loss(p, state), tppo.loss(t, state)
        # the same sums, grouped differently: PPO sums policy + value per token, T-PPO each over its own mask
        assert t_loss.item() == pytest.approx(p_loss.item(), abs=1e-6)
        for name in ("rl/policy_loss", "rl/value_loss", "rl/entropy", "reward/mean", "rl/value_mean"):
            assert t_metrics[name] == pytest.approx(p_metrics[name], abs=1e-6), name
    assert 0 < t_metrics["rl/truncated"] < 1 and t_metrics["rl/finished"] == 8
    assert tppo._pool is None and not tppo._backlog  # nothing carried over


def row_parts(mb: dict, i: int) -> tuple[list[int], torch.Tensor]:
    """Row i's prompt + response tokens and its response mask."""
    R = mb["policy_mask"].shape[1]
    return mb["input_ids"][i][mb["attention_mask"][i].bool()].tolist(), mb["attention_mask"][i, -R:].float()


def test_masks_take_each_window_once_and_finished_responses_whole():
    algo, state, stream = setup(make_policy(eos_bias=3.0), samples_per_prompt=2)  # B = 4, windows of 3, cap 8
    eos, open_rows, finished, carried = state.tokenizer.eos_token_id, Counter(), 0, 0
    for _ in range(8):  # no update in between: each window continues the last one's tokens
        mb = window(algo, state, stream)
        continued, still_open = Counter(), Counter()
        for i in range(len(mb["input_ids"])):
            tokens, response = row_parts(mb, i)
            n, k = int(response.sum()), int(mb["policy_mask"][i].sum())
            start = n - k  # M_pi: the last k response tokens, nothing before them and no prompt token
            assert torch.equal(mb["policy_mask"][i], response * (torch.arange(len(response)) >= start))
            assert k == min(3, 8 - start) or tokens[-1] == eos
            if start:  # a continued row: its tokens before the window are exactly last step's row
                continued[tuple(tokens[:-k])] += 1
            done = bool(mb["value_mask"][i].any())
            assert done == (n == 8 or tokens[-1] == eos)
            assert torch.equal(mb["value_mask"][i], response if done else torch.zeros_like(response))  # M_V
            finished += done
            if not done:
                still_open[tuple(tokens)] += 1
        assert continued == open_rows  # every unfinished row came back once, and no finished one did
        if mb["advantages"].any():  # whitened over M_pi, not over every response token
            adv, pm = mb["advantages"], mb["policy_mask"]
            assert masked_mean(adv, pm).item() == pytest.approx(0, abs=1e-5)
            assert masked_mean(adv.square(), pm).item() == pytest.approx(1 - 1 / pm.sum().item(), abs=1e-4)
        open_rows, carried = still_open, carried + sum(continued.values())
    assert finished > 4 and carried > 4


def test_all_generated_policy_mask_is_every_response_token():
    algo, state, stream = setup(make_policy(), policy_tokens="all_generated")
    for _ in range(2):
        mb = window(algo, state, stream)
        for i in range(len(mb["input_ids"])):
            assert torch.equal(mb["policy_mask"][i], row_parts(mb, i)[1])
    assert mb["policy_mask"].sum(-1).min() == 6  # the second window trains on both windows' tokens


def test_greedy_windows_equal_one_shot_generation():
    """Frozen policy, temperature 0: the windows of every finished response, stitched, are what one
    generate call with the whole budget produces (the pool mixes new prompts with continued rows)."""
    algo, state, stream = setup(make_policy(eos_bias=4.0, scramble=True), micro_batch=4, max_new_tokens=10, temperature=0.0)
    stitched, mixed = [], False
    for _ in range(8):
        mb = window(algo, state, stream)
        stitched += [row_parts(mb, i)[0] for i in range(len(mb["input_ids"])) if mb["value_mask"][i].any()]
        fresh = mb["policy_mask"].sum(-1) == mb["attention_mask"][:, -mb["policy_mask"].shape[1]:].sum(-1)
        mixed |= bool(fresh.any() and not fresh.all())
    drawn = [TASK.split("train")[i] for i in stream._order[: stream.pos]]
    tok = state.tokenizer
    prompts = prompt_batch([ex["prompt"] for ex in drawn], tok, "cpu")
    whole = sample(state.model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=10,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.0)
    one_shot = [ids[mask.bool()].tolist() for ids, mask in zip(*whole.sequences())]
    assert mixed and len(stitched) > 4 and all(row in one_shot for row in stitched)
    lengths = Counter(int(n) for n in whole.lengths)
    assert lengths[10] and len(lengths) > 2  # some hit the cap over 4 windows, others stop at EOS mid-window


class Recording:
    """Alternating rewards that remember which examples they scored (= which responses finished)."""

    def __init__(self):
        self.examples = []

    def __call__(self, responses, examples, task, lengths=None):
        self.examples += examples
        return Alternating()(responses, examples, task, lengths)


def test_pool_stays_full_and_every_response_finishes_once():
    scored = Recording()
    algo, state, stream = setup(make_policy(eos_bias=3.0), reward=scored, samples_per_prompt=2, window=2)
    for _ in range(8):
        assert len(window(algo, state, stream)["input_ids"]) == 4  # B = 2 prompts x 2 samples, every window
    finished = window(algo, state, stream)["metrics"]["rl/finished"]
    assert len(algo._rows) == 4 - finished  # the finished rows left the pool
    drawn = [TASK.split("train")[i] for i in stream._order[: stream.pos]]
    done, waiting = Counter(map(id, scored.examples)), Counter(map(id, algo._rows + algo._backlog))
    assert set(done) | set(waiting) <= set(map(id, drawn))
    assert all(done[id(ex)] + waiting[id(ex)] == 2 for ex in drawn)  # each of a prompt's 2 responses once
    assert sum(done.values()) > 8 and stream.pos > 4  # refills happened
    assert len(algo._backlog) < 4  # a micro-batch is drawn only when the backlog cannot fill the free rows


def test_state_dict_carries_the_pool_the_backlog_and_the_queue():
    algo, state, stream = setup(make_policy(eos_bias=3.0), samples_per_prompt=2, minibatches=2)
    for _ in range(5):  # two and a half windows: one minibatch of the third is still queued
        window(algo, state, stream)
    assert algo._rows and algo._backlog and len(algo._queue) == 1
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    resumed = setup(make_policy(eos_bias=3.0), samples_per_prompt=2, minibatches=2)[0]
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    rng, data = torch.get_rng_state(), stream.state_dict()
    ahead = [window(algo, state, stream) for _ in range(5)]
    torch.set_rng_state(rng)
    stream.load_state_dict(data)
    for a, b in zip(ahead, [window(resumed, state, stream) for _ in range(5)]):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_one_window_trains_policy_and_critic():
    algo, state, stream = setup(make_policy(eos_bias=3.0), samples_per_prompt=2, max_new_tokens=8, window=4)
    policy_before, head_before = copy.deepcopy(state.model.state_dict()), algo.critic.head.weight.clone()
    mb = window(algo, state, stream)
    loss, metrics = algo.loss(mb, state)
    loss.backward()
    state.optimizer.step()
    assert 0 < metrics["rl/finished"] < 4 and len(algo._rows) == 4 - metrics["rl/finished"]
    assert torch.isfinite(loss) and metrics["rl/value_loss"] > 0 and metrics["rl/value_tokens"] > 0
    assert metrics["rl/clip_frac"] == 0 and metrics["rl/approx_kl"] == pytest.approx(0, abs=1e-10)
    assert any(not torch.equal(policy_before[k], v) for k, v in state.model.state_dict().items())
    assert not torch.equal(head_before, algo.critic.head.weight)


def test_critic_learns_nothing_from_unfinished_responses():
    algo, state, stream = setup(make_policy(), max_new_tokens=8, window=3)  # no EOS in 3 tokens: nothing finishes
    mb = window(algo, state, stream)
    loss, metrics = algo.loss(mb, state)
    loss.backward()
    assert metrics["rl/finished"] == 0 and metrics["rl/value_tokens"] == 0 and "rl/value_loss" not in metrics
    assert all(p.grad is None for p in algo.critic.parameters())


def test_bad_settings_are_one_clear_error():
    reward, critic = WeightedSum({"r": Alternating()}, {"r": 1.0}), tiny(**SMALL, device="cpu")
    with pytest.raises(RlxError, match="policy_tokens='prefix'"):
        TPPO(reward, critic, policy_tokens="prefix")
    with pytest.raises(RlxError, match="window"):
        TPPO(reward, critic, window=0)


# Alternating rewards: an untrained model is never correct, and all-zero rewards make every loss 0
TPPO_RUN = ["algo=tppo", "algo.max_new_tokens=8", "trainer.micro_batch_size=2", "trainer.eval_every=0",
            "reward.terms.correct._target_=tests.algorithms.test_grpo.Alternating"]


def test_tppo_runs_in_the_loop_and_logs_its_metrics(tmp_path):
    summary = run_training(small_config(*TPPO_RUN, "algo.window=3"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    names = {"rl/finished", "rl/value_tokens", "rl/pool_len", "rl/rollout_s", "rl/gen_utilisation",
             "rl/policy_loss", "rl/entropy", "time/batch_s", "train/tokens_per_s"}
    assert names <= set(rows[0]) and rows[1]["rl/pool_len"] == 6  # two windows of 3, nothing finished
    assert summary["steps"] == 2 and summary["train/tokens"] == 2 * 2 * 3  # trained on each window once


def test_interrupted_tppo_resumes_with_its_pool_exactly(tmp_path):
    # windows of 5 with a cap of 8: responses finish every second step, so step 3 saves a full pool
    common = [*TPPO_RUN, "algo.window=5", "trainer.max_steps=6", "trainer.save_every=3"]
    run_training(small_config(*common), tmp_path / "straight")
    saved = torch.load(tmp_path / "straight" / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert len(saved["algo"]["rows"]) == 2 and saved["algo"]["pool"]["response_ids"].shape[1] == 5
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(*common, *hook("stop", "tests.support.InterruptAt", step=3)), tmp_path / "cut")
    run_training(small_config(*common, "trainer.resume=auto"), tmp_path / "cut")
    straight = losses(tmp_path / "straight")
    assert len(set(straight[1:])) == 5  # step 1 has V = 0 and nothing finished: loss 0; the rest differ
    assert losses(tmp_path / "cut") == pytest.approx(straight, abs=1e-6)
