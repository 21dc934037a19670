"""PPO for language models (Schulman et al., 2017; Ouyang et al., 2022): a learned critic, GAE,
the clipped surrogate, a clipped value loss, several epochs of minibatches per rollout.

    rlx train algo=ppo model=tiny_sft
    rlx train algo=ppo algo.reference='${model}' algo.kl_reward_coef=0.05    # KL in the reward (TRL)
    rlx train algo=ppo algo.reference='${model}' algo.kl_coef=0.01           # KL as a loss term

One rollout: the micro-batch's prompts are each sampled `samples_per_prompt` times and scored by
the `reward` config group. The score is the reward of the response's last token; with
`kl_reward_coef`, every token also gets -kl_reward_coef * (log pi - log pi_ref) (k1, TRL's
default). GAE(gamma, lam) over those per-token rewards and the critic's values gives advantages
(whitened over the rollout) and returns. The rollout is then replayed for `epochs` passes, each a
fresh shuffle cut into `minibatches` minibatches; every `make_batch` call hands out the next
minibatch, so one optimizer step uses `trainer.grad_accum` of them and a rollout lasts
epochs * minibatches / grad_accum steps (the loop draws no prompts meanwhile). The loss per token
is the clipped surrogate + vf_coef * clipped value loss (+ kl_coef * KL to the reference),
aggregated per `loss_agg` (token_mean, as TRL's PPOTrainer).

The critic is a second copy of the policy's model (`critic: ${model}`, as TRL and verl use a
separate value model) whose LM head is replaced by a zero-initialised Linear(hidden, 1), so
every value starts at 0 (`rlx.algorithms._critic`, shared with T-PPO; so is the minibatch
queue, `rlx.algorithms._replay`). Its parameters join the loop's optimizer as a second parameter group
(`param_groups()`, at `critic_lr` if set: verl's critic.optim.lr) and are
checkpointed with the rollout being replayed (`state_dict()`), so a resumed run continues
exactly. Names: TRL num_ppo_epochs / num_mini_batches / vf_coef / cliprange_value / kl_coef;
verl ppo_epochs / ppo_mini_batch_size / critic.cliprange_value / algorithm.kl_ctrl.
"""
from __future__ import annotations

import torch

from rlx.algorithms._critic import ValueModel, critic_group, score_rewards
from rlx.algorithms._group import frozen
from rlx.algorithms._replay import Replay, minibatches
from rlx.algorithms._rl import (
    AGG_MODES,
    aggregate,
    aggregation_weight,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalty,
    masked_mean,
    whiten,
)
from rlx.algorithms._sampling import sample_and_score
from rlx.errors import RlxError
from rlx.models import reference_model
from rlx.rollout import eval_mode, sequence_logprobs, sequence_logprobs_and_entropy


class PPO:
    needs_trained_model = True

    def __init__(
        self,
        reward,
        critic,
        samples_per_prompt: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        epochs: int = 2,
        minibatches: int = 2,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        vf_coef: float = 0.1,
        value_clip: float = 0.2,
        whiten_advantages: bool = True,
        loss_agg: str = "token_mean",
        kl_reward_coef: float = 0.0,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        reference=None,
        critic_lr: float | None = None,
    ):
        if loss_agg not in AGG_MODES:
            raise RlxError(f"unknown algo.loss_agg={loss_agg!r}; valid: {', '.join(AGG_MODES)}")
        if min(samples_per_prompt, epochs, minibatches) < 1:
            raise RlxError("algo.samples_per_prompt, algo.epochs and algo.minibatches must be >= 1")
        if (kl_coef > 0 or kl_reward_coef > 0) and reference is None:
            raise RlxError("algo.kl_coef / algo.kl_reward_coef > 0 need a reference model: add algo.reference='${model}'")
        self.reward, self.n, self.max_new_tokens = reward, samples_per_prompt, max_new_tokens
        self.temperature, self.top_p, self.epochs, self.minibatches = temperature, top_p, epochs, minibatches
        self.eps_low, self.eps_high, self.gamma, self.lam = eps_low, eps_high, gamma, lam
        self.vf_coef, self.value_clip, self.whiten_advantages, self.loss_agg = vf_coef, value_clip, whiten_advantages, loss_agg
        self.kl_reward_coef, self.kl_coef, self.kl_estimator = kl_reward_coef, kl_coef, kl_estimator
        self.reference = frozen(reference)
        self.critic, self.critic_lr = ValueModel(critic.model), critic_lr
        self._queue = Replay()  # the minibatches of the rollout being replayed

    # ------------------------------------------------------------------ what the loop sees

    def param_groups(self) -> list[dict]:
        return critic_group(self.critic, self.critic_lr)

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "queue": self._queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "critic" in state:
            self.critic.load_state_dict(state["critic"])
        self._queue.load_state_dict(state.get("queue", []))

    def make_batch(self, examples, state) -> dict:
        # only when the queue is empty are `examples` drawn from the stream
        return self._queue.next(lambda: self._rollout(examples, state), state.model.device)

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        model = state.model
        scored = sample_and_score(examples, state, self.reward, n=self.n, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p)
        input_ids, attention_mask = scored.rollout.sequences()
        mask = scored.rollout.response_mask.float()
        B, R = mask.shape
        if B < self.minibatches:
            raise RlxError(f"a rollout of {B} responses cannot make algo.minibatches={self.minibatches}")
        with eval_mode(model, self.critic):  # behaviour log-probs and values without dropout, as TRL
            old_logprobs = sequence_logprobs(model, input_ids, attention_mask, R, self.temperature)
            old_values = self.critic(input_ids, attention_mask, R)
        metrics = dict(scored.metrics)
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": mask,
                "old_logprobs": old_logprobs, "old_values": old_values}
        kl = None
        if self.reference is not None:  # the reference is frozen in eval mode
            with reference_model(self.reference, model) as reference:
                data["ref_logprobs"] = sequence_logprobs(reference, input_ids, attention_mask, R, self.temperature)
            kl = kl_penalty(old_logprobs, data["ref_logprobs"], "k1")
            metrics["rl/kl"] = masked_mean(kl_penalty(old_logprobs, data["ref_logprobs"], self.kl_estimator), mask).item()
        token_rewards = score_rewards(scored.rewards.to(mask.device), mask, kl, self.kl_reward_coef)
        advantages, returns = gae(token_rewards, old_values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask)
        data.update(advantages=advantages, returns=returns)
        metrics["rl/value_mean"] = masked_mean(old_values, mask).item()
        metrics["rl/return_mean"] = masked_mean(returns, mask).item()
        weight = lambda mask: aggregation_weight(mask, self.loss_agg, self.max_new_tokens)
        return minibatches(data, self.minibatches, weight, metrics, epochs=self.epochs)  # fresh shuffle per epoch

    # ------------------------------------------------------------------ loss

    def loss(self, batch: dict, state):
        ids, am, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        R = mask.shape[1]
        logprobs, entropy = sequence_logprobs_and_entropy(state.model, ids, am, R, self.temperature)
        policy, clipped = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                              self.eps_low, self.eps_high)
        values = self.critic(ids, am, R)
        value, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, self.value_clip)
        per_token = policy + self.vf_coef * value
        metrics = dict(batch["metrics"])
        if self.kl_coef:
            kl = kl_penalty(logprobs, batch["ref_logprobs"], self.kl_estimator)
            per_token = per_token + self.kl_coef * kl
        loss = aggregate(per_token, mask, self.loss_agg, self.max_new_tokens)
        log_ratio = (logprobs - batch["old_logprobs"]).detach()
        metrics.update({
            "train/loss": loss.detach(),
            "rl/policy_loss": aggregate(policy, mask, self.loss_agg, self.max_new_tokens).item(),
            "rl/value_loss": aggregate(value, mask, self.loss_agg, self.max_new_tokens).item(),
            "rl/clip_frac": masked_mean(clipped.float(), mask).item(),
            "rl/value_clip_frac": masked_mean(value_clipped.float(), mask).item(),
            "rl/entropy": masked_mean(entropy, mask).item(),
            "rl/approx_kl": masked_mean(0.5 * log_ratio.square(), mask).item(),  # TRL's approxkl
        })
        return loss, metrics
