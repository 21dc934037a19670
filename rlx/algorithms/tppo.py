"""T-PPO: Truncated Proximal Policy Optimization (Fan et al., 2025, ByteDance Seed; arXiv 2506.15050).
PPO with a critic, where generation is cut into windows and every window is trained on while
most responses are still unfinished, so an update never waits for the longest response.

    rlx train algo=tppo model=tiny_sft
    rlx train algo=tppo algo.window=16 algo.max_new_tokens=256
    rlx train algo=tppo algo.policy_tokens=all_generated

A pool of B = trainer.micro_batch_size x samples_per_prompt responses is generated side by side.
One rollout step extends every response in the pool by a window of at most `window` tokens
(`rlx.rollout.extend`); a response finishes at EOS or at the hard cap `max_new_tokens`. The
finished ones are scored by the `reward` config group and leave the pool, and the next step
refills it with new prompts from the training stream (the paper's "successive batching"), so
the pool stays full. Each step trains on what it generated (token MDP: s_t = (prompt, o_<t),
r_t = 0 except the score on a finished response's last token):

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
    finished after T tokens, V(s_T) = 0:  A_t = sum_{k=0}^{T-t-1} (gamma lam)^k delta_{t+k}   GAE
    unfinished, l tokens so far:          A_t = sum_{k=0}^{l-t-1} (gamma lam)^k delta_{t+k}   Extended GAE
                                          with V(s_l) := V(s_{l-1}), so delta_{l-1} = (gamma - 1) V(s_{l-1})
    L_pi = -mean_{t in M_pi} min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)      PPO clip
    L_V  = 0.5 mean_{t in M_V} (V(s_t) - G_t)^2,  G_t the Monte Carlo return (gamma = 1: the score)
    loss = L_pi + vf_coef L_V

    M_pi  policy_tokens=window: the tokens generated in this step's window, in every response,
          finished or not; policy_tokens=all_generated: every response token generated so far
    M_V   every response token of the responses that finished in this step (none of the others)

Advantages are whitened over M_pi. With window >= max_new_tokens every response finishes in its
first window and this is rlx PPO (`rlx.algorithms.ppo`): same advantages, masks and losses on the
same rollout (given critic_lam = lam; tests/algorithms/test_tppo.py checks it).

Sources: the paper body could not be checked. The method, the Extended GAE assumption
V(s_l) = V(s_{l-1}) and the masks above follow the abstract, the Fig. 1 caption, the four public
ICLR 2026 reviews and a third-party reading of the paper's truncation, Extended GAE, successive
batching and training-configuration sections. Choices marked (unconfirmed) are config options whose
default is what that evidence favours:

* policy_tokens=window (unconfirmed): the mask as the paper describes it (earlier windows' tokens were
  trained on already); one reviewer reads it as every generated token, hence `all_generated`.
  `window` trains each token once, at the step its sampling policy is current.
* lam=0.95 for the policy (unconfirmed): the group's VC-PPO value (VAPO used a length-adaptive lam).
* critic_lam=1.0 (unconfirmed): the critic regresses on Monte Carlo returns of finished responses.
  critic_lam=lam gives PPO's TD(lam) targets (the limiting case above).
* eps_low=0.2, eps_high=0.28 (unconfirmed): clip-higher, as in the group's DAPO and VAPO.
* window=32, max_new_tokens=128: the paper runs 8K windows of a 24K budget (unconfirmed); here the
  budget is sized to the task's responses (30-100 tokens for the tiny SFT model), window = cap / 4.

Deviations, on purpose:
* the critic is PPO's ValueModel with a zero-initialised head (V = 0), not a value model
  pretrained on the SFT model as in the paper (unconfirmed). With gamma = 1 Extended GAE then gives
  an unfinished response's tokens A = 0 until the critic has learnt from finished ones: raise
  critic_lr so it catches up quickly.
* old log-probs are recomputed by the current policy right after the window is generated (rlx
  PPO does the same; the paper's step 4 computes them then). For the window's tokens that is the
  sampling policy up to float rounding, so the first minibatch's ratios are exactly 1 and the
  limiting case is exact. With policy_tokens=all_generated, earlier windows' tokens were sampled
  by older policies and get no importance correction for it; `rl/behaviour_kl` shows the gap
  (0.5 (log pi_sampled - log pi_old)^2 over M_pi).
* the value loss is PPO's clipped one (value_clip). On a window's first minibatch V = V_old, so
  it equals the paper's 0.5 (V - G)^2; the clip acts only on later replays.
* optimizer steps per window: the window's rows are replayed for `epochs` passes of
  `minibatches` shuffled minibatches, as in PPO; the default 1 x 1 is one optimizer step per
  window (the paper's mini-batch equals its batch, 512 prompts).
* no KL term and no reference model (the paper uses none).
* a window is one batched generation per distinct remaining budget (fresh prompts are responses
  of length 0, which `extend` prefills as `sample` would), not one for new prompts and one for old;
  a response's last window is shortened to end at max_new_tokens.
* the pool is refilled at the start of a step rather than the end of the previous one: the same
  schedule, but prompts are drawn only when a window needs them and a checkpoint holds only
  unfinished responses.
* the samples_per_prompt copies of a prompt enter the pool together but finish and leave it
  independently (PPO uses no group baseline).
* L_pi is aggregated per `loss_agg` over M_pi and L_V over the finished rows' M_V, each on its own
  denominator; the loop weights micro-batches by the policy's num_targets, so with
  trainer.grad_accum > 1 the value term is each micro-batch's own mean.

Metrics: the shared rollout names (reward/mean, rl/accuracy, rl/response_len, rl/truncated, ...)
describe the responses that finished in the step and are logged only on steps where some did.
rl/finished counts them, rl/value_tokens is |M_V|, rl/pool_len the mean length of the pool's
responses after the window, rl/rollout_s the window's generation time (what T-PPO cuts: PPO
waits for its longest response), and rl/gen_utilisation the generated tokens over the
rows x decoding steps of the window (PPO's is rl/response_len / rl/response_len_max).

Checkpoints hold the critic, the pool of unfinished responses, the prompts drawn but not yet in
the pool, and the minibatches being replayed, so a resumed run continues exactly.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from rlx.algorithms._critic import ValueModel, critic_group, score_rewards
from rlx.algorithms._replay import Replay, minibatches
from rlx.algorithms._rl import (
    AGG_MODES,
    aggregate,
    aggregation_weight,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_mean,
    whiten,
)
from rlx.algorithms._sampling import score
from rlx.data.collate import prompt_batch
from rlx.errors import RlxError
from rlx.rollout import Rollout, eval_mode, extend, sequence_logprobs, sequence_logprobs_and_entropy

POLICY_TOKENS = ("window", "all_generated")


def extended_gae(rewards: Tensor, values: Tensor, mask: Tensor, finished: Tensor, gamma: float,
                 lam: float) -> tuple[Tensor, Tensor]:
    """GAE where finished rows end in V = 0 and unfinished ones bootstrap the unseen future with
    V(s_l) := V(s_{l-1}), the value at their last valid token (T-PPO's Extended GAE).

    The bootstrap enters as a reward gamma V(s_{l-1}) on the last valid token, which leaves every
    delta as the definition has it; finished rows get + 0, so they are exactly `gae`.
    Returns (advantages, returns) as `gae` does; `finished` is bool [B]."""
    rows = torch.arange(len(finished), device=mask.device)
    last = mask.sum(-1).long().clamp(min=1) - 1
    bootstrap = torch.where(finished, 0.0, values[rows, last] * mask[rows, last])
    rewards = rewards.clone()
    rewards[rows, last] += gamma * bootstrap
    return gae(rewards, values, mask, gamma, lam)


def _trim(rollout: Rollout) -> Rollout:
    """Drop the prompt columns that are padding in every row and the response columns past the longest."""
    P, R = int(rollout.prompt_mask.sum(-1).max()), int(rollout.lengths.max())
    cut = rollout.prompt_ids.shape[1] - P
    return Rollout(rollout.prompt_ids[:, cut:], rollout.prompt_mask[:, cut:], rollout.response_ids[:, :R],
                   rollout.response_mask[:, :R], rollout.logprobs[:, :R], rollout.finished)


class TPPO:
    needs_trained_model = True

    def __init__(
        self,
        reward,
        critic,
        samples_per_prompt: int = 1,
        max_new_tokens: int = 128,
        window: int = 32,
        policy_tokens: str = "window",
        temperature: float = 1.0,
        top_p: float = 1.0,
        epochs: int = 1,
        minibatches: int = 1,
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        gamma: float = 1.0,
        lam: float = 0.95,
        critic_lam: float = 1.0,
        vf_coef: float = 0.1,
        value_clip: float = 0.2,
        whiten_advantages: bool = True,
        loss_agg: str = "token_mean",
        critic_lr: float | None = None,
    ):
        if loss_agg not in AGG_MODES:
            raise RlxError(f"unknown algo.loss_agg={loss_agg!r}; valid: {', '.join(AGG_MODES)}")
        if policy_tokens not in POLICY_TOKENS:
            raise RlxError(f"unknown algo.policy_tokens={policy_tokens!r}; valid: {', '.join(POLICY_TOKENS)}")
        if min(samples_per_prompt, epochs, minibatches, window, max_new_tokens) < 1:
            raise RlxError("algo.samples_per_prompt, epochs, minibatches, window and max_new_tokens must be >= 1")
        self.reward, self.n, self.max_new_tokens, self.window = reward, samples_per_prompt, max_new_tokens, window
        self.policy_tokens, self.temperature, self.top_p = policy_tokens, temperature, top_p
        self.epochs, self.minibatches, self.eps_low, self.eps_high = epochs, minibatches, eps_low, eps_high
        self.gamma, self.lam, self.critic_lam = gamma, lam, critic_lam
        self.vf_coef, self.value_clip, self.whiten_advantages, self.loss_agg = vf_coef, value_clip, whiten_advantages, loss_agg
        self.critic, self.critic_lr = ValueModel(critic.model), critic_lr
        # the most policy tokens a response adds to one step: seq_mean_token_sum_norm's constant
        self._policy_len = min(window, max_new_tokens) if policy_tokens == "window" else max_new_tokens
        self._size = 0  # B, known at the first draw
        self._pool: Rollout | None = None  # the unfinished responses, row i answering self._rows[i]
        self._rows: list[dict] = []
        self._backlog: list[dict] = []  # drawn prompts (x samples_per_prompt) waiting for a free row
        self._queue = Replay()  # the minibatches of the window being replayed

    # ------------------------------------------------------------------ what the loop sees

    def param_groups(self) -> list[dict]:
        return critic_group(self.critic, self.critic_lr)

    def state_dict(self) -> dict:
        pool = None if self._pool is None else dict(vars(self._pool))
        return {"critic": self.critic.state_dict(), "queue": self._queue.state_dict(), "pool": pool, "rows": self._rows,
                "backlog": self._backlog, "size": self._size}

    def load_state_dict(self, state: dict) -> None:
        if "critic" in state:
            self.critic.load_state_dict(state["critic"])
        device = self.critic.head.weight.device
        to = lambda d: {k: v.to(device) if isinstance(v, Tensor) else v for k, v in d.items()}
        self._queue.load_state_dict(state.get("queue", []))
        self._pool = Rollout(**to(state["pool"])) if state.get("pool") is not None else None
        self._rows, self._backlog = list(state.get("rows", [])), list(state.get("backlog", []))
        self._size = state.get("size", 0)

    def make_batch(self, examples, state) -> dict:
        # only when the queue is empty is a window generated (and `examples` perhaps drawn)
        return self._queue.next(lambda: self._step(examples, state), state.model.device)

    # ------------------------------------------------------------------ the pool

    def _refill(self, examples, state) -> None:
        """Fill the pool's free rows with new prompts: from the backlog, topped up with `examples`
        (B rows, at least as many as are free) only when it runs short, so only then is the
        stream's next micro-batch drawn."""
        if not self._size:
            self._size = len(examples) * self.n
        free = self._size - len(self._rows)
        if len(self._backlog) < free:
            self._backlog += [ex for ex in examples for _ in range(self.n)]
        if free == 0:
            return
        fresh, self._backlog = self._backlog[:free], self._backlog[free:]
        prompts = prompt_batch([ex["prompt"] for ex in fresh], state.tokenizer, state.model.device)
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        empty = Rollout(ids, mask, ids[:, :0], mask[:, :0], torch.zeros(len(fresh), 0, device=ids.device),
                        torch.zeros(len(fresh), dtype=torch.bool, device=ids.device))
        parts = [self._pool, empty] if self._rows else [empty]
        self._pool, self._rows = Rollout.concat(parts, state.tokenizer.pad_token_id), self._rows + fresh

    def _generate(self, model, tok) -> tuple[Rollout, int]:
        """The pool after one window, and the window's decoding slots (rows x steps, for utilisation).
        Rows with the same remaining budget min(window, max_new_tokens - length) share one call."""
        pool = self._pool
        budgets = (self.max_new_tokens - pool.lengths).clamp(max=self.window)
        parts, order, slots = [], [], 0
        for budget in budgets.unique().tolist():
            rows = (budgets == budget).nonzero().squeeze(-1)
            part = pool.select(rows)
            grown = extend(model, part, max_new_tokens=budget, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, temperature=self.temperature, top_p=self.top_p)
            parts.append(grown)
            order.append(rows)
            slots += len(rows) * int((grown.lengths - part.lengths).max())
        grown = Rollout.concat(parts, tok.pad_token_id) if len(parts) > 1 else parts[0]
        return grown.select(torch.cat(order).argsort()), slots

    def _score(self, pool: Rollout, done: Tensor, state) -> tuple[Tensor, dict]:
        """Scores [B] of the rows that finished (0 for the others) and the shared rollout metrics
        over them (the names of `rlx.algorithms._sampling`)."""
        scores = torch.zeros(len(done))
        idx = done.nonzero().squeeze(-1)
        if len(idx) == 0:
            return scores, {}
        rewards, _, metrics = score(pool.select(idx), [self._rows[i] for i in idx.tolist()], state, self.reward)
        scores[idx.cpu()] = rewards
        return scores, metrics

    # ------------------------------------------------------------------ one window

    @torch.no_grad()
    def _step(self, examples, state) -> list[dict]:
        """Refill, generate one window, score what finished, compute advantages and value targets,
        drop the finished rows from the pool, and cut the window into minibatches."""
        model = state.model
        self._refill(examples, state)
        start = self._pool.lengths  # each row's response length before this window
        t0 = time.perf_counter()
        pool, slots = self._generate(model, state.tokenizer)
        rollout_s = time.perf_counter() - t0
        done = pool.finished | (pool.lengths >= self.max_new_tokens)
        scores, metrics = self._score(pool, done, state)
        input_ids, attention_mask = pool.sequences()
        mask = pool.response_mask.float()
        B, R = mask.shape
        if B < self.minibatches:
            raise RlxError(f"a pool of {B} responses cannot make algo.minibatches={self.minibatches}")
        in_window = (torch.arange(R, device=mask.device) >= start[:, None]).float()
        policy_mask = mask * in_window if self.policy_tokens == "window" else mask
        value_mask = mask * done[:, None].float()
        with eval_mode(model, self.critic):  # behaviour log-probs and values without dropout, as TRL
            old_logprobs = sequence_logprobs(model, input_ids, attention_mask, R, self.temperature)
            old_values = self.critic(input_ids, attention_mask, R)
        token_rewards = score_rewards(scores.to(mask.device), mask)
        advantages, _ = extended_gae(token_rewards, old_values, mask, done, self.gamma, self.lam)
        _, returns = gae(token_rewards, old_values, mask, self.gamma, self.critic_lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, policy_mask)
        generated = int((pool.lengths - start).sum())
        metrics.update({
            "rl/finished": int(done.sum()),
            "rl/value_tokens": int(value_mask.sum()),
            "rl/pool_len": pool.lengths.float().mean().item(),
            "rl/rollout_s": rollout_s,
            "rl/rollout_tokens_per_s": generated / rollout_s,
            "rl/gen_utilisation": generated / slots,
            "rl/behaviour_kl": masked_mean(0.5 * (pool.logprobs - old_logprobs).square(), policy_mask).item(),
            "rl/value_mean": masked_mean(old_values, policy_mask).item(),
            "rl/return_mean": masked_mean(returns, value_mask).item(),
        })
        keep = (~done).nonzero().squeeze(-1)
        self._pool = _trim(pool.select(keep)) if len(keep) else None
        self._rows = [self._rows[i] for i in keep.tolist()]
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "policy_mask": policy_mask,
                "value_mask": value_mask, "old_logprobs": old_logprobs, "old_values": old_values,
                "advantages": advantages, "returns": returns}
        weight = lambda mask: aggregation_weight(mask, self.loss_agg, self._policy_len)
        return minibatches(data, self.minibatches, weight, metrics, mask="policy_mask", epochs=self.epochs)

    # ------------------------------------------------------------------ loss

    def loss(self, batch: dict, state):
        ids, am, pmask = batch["input_ids"], batch["attention_mask"], batch["policy_mask"]
        R = pmask.shape[1]
        logprobs, entropy = sequence_logprobs_and_entropy(state.model, ids, am, R, self.temperature)
        policy, clipped = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], pmask,
                                              self.eps_low, self.eps_high)
        policy_loss = aggregate(policy, pmask, self.loss_agg, self._policy_len)
        value_loss, metrics = self._value_loss(batch)
        loss = policy_loss + self.vf_coef * value_loss
        log_ratio = (logprobs - batch["old_logprobs"]).detach()
        metrics.update({
            "train/loss": loss.detach(),
            "rl/policy_loss": policy_loss.item(),
            "rl/clip_frac": masked_mean(clipped.float(), pmask).item(),
            "rl/entropy": masked_mean(entropy, pmask).item(),
            "rl/approx_kl": masked_mean(0.5 * log_ratio.square(), pmask).item(),  # TRL's approxkl
        })
        return loss, {**batch["metrics"], **metrics}

    def _value_loss(self, batch: dict) -> tuple[Tensor, dict]:
        """L_V over the rows that finished in the window (the critic runs on those rows only)."""
        vmask = batch["value_mask"]
        rows = vmask.any(-1)
        if not rows.any():
            return torch.zeros((), device=vmask.device), {}
        vmask = vmask[rows]
        values = self.critic(batch["input_ids"][rows], batch["attention_mask"][rows], vmask.shape[1])
        value, clipped = clipped_value_loss(values, batch["old_values"][rows], batch["returns"][rows], vmask,
                                            self.value_clip)
        value_loss = aggregate(value, vmask, self.loss_agg, self.max_new_tokens)
        return value_loss, {"rl/value_loss": value_loss.item(),
                            "rl/value_clip_frac": masked_mean(clipped.float(), vmask).item()}
