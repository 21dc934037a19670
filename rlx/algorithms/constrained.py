"""Constrained RLHF (Moskovitz, Singh, Strouse, Sandholm, Salakhutdinov, Dragan and McAleer, 2023,
arXiv 2310.04373): each reward component a constraint at its threshold (its "proxy point", past which
more of it hurts the true objective), a learned Lagrange multiplier per component as its weight,
and the objective itself staying close to the reference.

    rlx train algo=constrained                                # correctness held at 0.9, the KL as objective
    rlx train algo=constrained reward=correct_format algo.thresholds.correct=0.9 +algo.thresholds.format=0.95
    rlx train algo=constrained reward=rm reward.terms.rm.checkpoint=PATH ~algo.thresholds.correct +algo.thresholds.rm=1.5
    rlx train algo=constrained ... algo.equality=false        # v_i >= theta_i: a satisfied term is ignored

The problem (the paper's; its official code's form): max_pi v_KL(pi) subject to v_i(pi) = theta_i
(or >=), with v_KL the expected KL "reward" -beta sum_t (log pi - log pi_ref) and v_i the expected
value of reward term i. Its Lagrangian's policy step follows the mixed advantage

    mu_i  = tanh(z_i)  (equality: a term above its threshold is pushed back down)   or  sigmoid(z_i)  (inequality)
    A_mix = (N - sum_i mu_i) A_KL + sum_i mu_i A_i           each A normalised to zero mean, unit std first

and the multipliers descend the Lagrangian, l_mu = sum_i mu_i stopgrad(v_hat_i - theta_i), by SGD with
momentum on z (lr 0.1, momentum 0.1, as the official code): a term short of its threshold gains
weight, one past it loses weight (and under tanh turns negative).

Transferred to rlx's critic-free GRPO setting (say so when comparing with the paper's PPO):
* the per-stream advantages are GRPO's group-centred ones (each prompt's `group_size` samples as the
  baseline), not GAE with one value head per stream; the KL stream is the sampled sequence log-ratio
  to the reference under the behaviour policy, one value per response;
* the streams are normalised over the whole rollout and the multipliers stepped once per rollout
  (the code does both per PPO minibatch); v_hat_i is the rollout's mean of term i;
* the clipped surrogate, minibatch replay and aggregation are GRPO's (rlx.algorithms._group), with
  no separate KL term in the loss: the KL is the objective stream;
* the Nelder-Mead search over thresholds is not built: thresholds are given.

Reward terms are the `reward` group's terms (its weights are unused: the multipliers are the
weights). Metrics: constraint/mu_<term>, constraint/value_<term> (v_hat) and constraint/slack_<term>
(v_hat - theta) per term, rl/kl (mean sequence log-ratio to the reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.algorithms._group import (
    check_settings,
    frozen,
    group_minibatches,
    grpo_loss,
    policy_term,
    rollout_tensors,
)
from rlx.algorithms._replay import Replay
from rlx.algorithms._rl import aggregation_weight, group_advantages
from rlx.algorithms._sampling import sample_and_score
from rlx.errors import RlxError

# ---------------------------------------------------------------------------- the pieces


def multipliers(z: Tensor, equality: bool) -> Tensor:
    """mu from the unconstrained logits: tanh (equality constraints, in (-1, 1)) or sigmoid (>=, in (0, 1))."""
    return torch.tanh(z) if equality else torch.sigmoid(z)


def mixed_advantage(kl_advantage: Tensor, term_advantages: Tensor, mu: Tensor) -> Tensor:
    """[B] (N - sum mu) A_KL + sum_i mu_i A_i, with `term_advantages` [N, B]."""
    n = mu.numel()
    return (n - mu.sum()) * kl_advantage + (mu[:, None] * term_advantages).sum(0)


def multiplier_step(z: Tensor, momentum_buffer: Tensor, slack: Tensor, equality: bool, lr: float,
                    momentum: float) -> tuple[Tensor, Tensor]:
    """One SGD-with-momentum step on l_mu = sum_i mu(z_i) * slack_i (slack = v_hat - theta, a constant):
    dl/dz_i = mu'(z_i) slack_i; buf = momentum * buf + grad; z -= lr * buf (torch.optim.SGD's rule)."""
    mu = multipliers(z, equality)
    dmu = 1 - mu.square() if equality else mu * (1 - mu)
    buffer = momentum * momentum_buffer + dmu * slack
    return z - lr * buffer, buffer


def normalised(x: Tensor) -> Tensor:
    """Zero mean, unit (unbiased) std; a constant stream stays 0."""
    return (x - x.mean()) / (x.std() + 1e-8) if x.numel() > 1 else x - x.mean()


# ---------------------------------------------------------------------------- the algorithm


class Constrained:
    needs_trained_model = True

    def __init__(self, reward, thresholds: dict, reference=None, beta: float = 0.05, equality: bool = True,
                 lagrange_lr: float = 0.1, lagrange_momentum: float = 0.1, init_std: float = 0.01,
                 normalize: bool = True, group_size: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.2, loss_agg: str = "token_mean",
                 minibatches: int = 1, seed: int = 0):
        terms = list(getattr(reward, "terms", {}))
        thresholds = dict(thresholds or {})
        if not thresholds or set(thresholds) - set(terms):
            raise RlxError(f"algo.thresholds names the constrained reward terms (+algo.thresholds.<term>=VALUE adds one); "
                           f"the reward's terms are {terms}, got {sorted(thresholds)}")
        if beta > 0 and reference is None:
            raise RlxError("algo.beta > 0: the objective is the KL to a reference model: add algo.reference='${model}'")
        if lagrange_lr < 0:
            raise RlxError(f"algo.lagrange_lr={lagrange_lr} must be >= 0 (0: fixed multipliers, fixed-weight RL)")
        check_settings(group_size, loss_agg=loss_agg, minibatches=minibatches)
        self.reward, self.names = reward, list(thresholds)
        self.theta = torch.tensor([float(thresholds[k]) for k in self.names])
        self.reference, self.beta, self.equality = frozen(reference), beta, equality
        self.lr, self.momentum, self.normalize = lagrange_lr, lagrange_momentum, normalize
        self.group_size, self.max_new_tokens, self.temperature, self.top_p = group_size, max_new_tokens, temperature, top_p
        self.eps_low, self.eps_high, self.loss_agg, self.minibatches = eps_low, eps_high, loss_agg, minibatches
        g = torch.Generator().manual_seed(seed)
        self.z = init_std * torch.randn(len(self.names), generator=g)  # the code's N(0, 0.01) init
        self.buffer = torch.zeros(len(self.names))
        self._queue = Replay()

    def param_groups(self) -> list[dict]:
        return []  # the multipliers have their own SGD step, outside the loop's optimizer

    def state_dict(self) -> dict:
        return {"queue": self._queue.state_dict(), "z": self.z.clone(), "buffer": self.buffer.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._queue.load_state_dict(state.get("queue", []))
        if "z" in state:
            self.z, self.buffer = state["z"].clone(), state["buffer"].clone()

    def make_batch(self, examples, state) -> dict:
        return self._queue.next(lambda: self._rollout(examples, state), state.model.device)

    def advantages(self, terms: Tensor, kl_reward: Tensor) -> Tensor:
        """A_mix [B] from the constrained terms' values [N, B] and the KL stream [B], at the current mu."""
        G = self.group_size
        streams = [group_advantages(r, G, scale="none") for r in (kl_reward, *terms)]
        if self.normalize:
            streams = [normalised(a) for a in streams]
        return mixed_advantage(streams[0], torch.stack(streams[1:]), multipliers(self.z, self.equality))

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        values: dict[str, Tensor] = {}

        def recorded(responses, rows, task, lengths=None):  # the reward, keeping each term's values
            values.update(self.reward.term_values(responses, rows, task, lengths))
            return self.reward.combine(values, len(responses))

        scored = sample_and_score(examples, state, recorded, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p)
        terms = torch.stack([values[name] for name in self.names])  # [N, B]
        reference = self.reference if self.beta > 0 else None
        data = rollout_tensors(scored, state, self.temperature, behaviour=True, reference=reference)
        mask = data["response_mask"]
        if reference is not None:
            log_ratio = ((data["old_logprobs"] - data["ref_logprobs"]) * mask).sum(-1).cpu()
        else:
            log_ratio = torch.zeros(mask.shape[0])
        data["advantages"] = self.advantages(terms, -self.beta * log_ratio).to(mask.device)
        if self.minibatches == 1:
            data.pop("old_logprobs")  # one step per rollout: old = current (GRPO's convention)
        values = terms.mean(1)
        metrics = {**scored.metrics, "rl/kl": log_ratio.mean().item()}
        mu = multipliers(self.z, self.equality)
        for i, name in enumerate(self.names):
            metrics.update({f"constraint/mu_{name}": mu[i].item(), f"constraint/value_{name}": values[i].item(),
                            f"constraint/slack_{name}": (values[i] - self.theta[i]).item()})
        self.z, self.buffer = multiplier_step(self.z, self.buffer, values - self.theta, self.equality, self.lr,
                                              self.momentum)
        weight = lambda m: aggregation_weight(m, self.loss_agg, self.max_new_tokens)
        return group_minibatches(data, self.minibatches, self.group_size, weight, metrics)

    def loss(self, batch: dict, state):
        term = policy_term("clip", self.eps_low, self.eps_high)
        return grpo_loss(batch, state, term, temperature=self.temperature, loss_agg=self.loss_agg,
                         max_len=self.max_new_tokens)
