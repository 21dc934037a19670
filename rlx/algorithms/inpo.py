"""INPO: Iterative Nash Policy Optimization (Zhang et al., "Iterative Nash Policy Optimization:
Aligning LLMs with General Preferences via No-Regret Learning", arXiv 2407.00617, ICLR 2025).

    rlx train algo=inpo                                   # SFT base, reasoning_pairs prompts, the checker
    rlx train algo=inpo algo.eta=0.05 algo.tau=0.0167     # another eta (keep tau/eta = 1/3 as the paper)
    rlx train algo=inpo reward=rm reward.terms.rm.checkpoint=<an algo=rm run>   # a reward model judges

Alignment as a game over a general preference P(y > y'); the policy plays against its previous
self by online mirror descent (OMD). With eta the weight of the KL(pi || pi_t) proximity term
(1/eta the OMD learning rate; the paper's convention) and tau that of KL(pi || pi_ref):

    pi_{t+1}(y) ∝ exp(P(y > pi_t) / eta) · pi_ref(y)^(tau/eta) · pi_t(y)^(1 - tau/eta)          [eq. 5]
    h_t(pi, y, y') = log pi(y)/pi(y') - (tau/eta) log pi_ref(y)/pi_ref(y')
                     - (1 - tau/eta) log pi_t(y)/pi_t(y')                                     [§3.2]
    loss = E_{(y_w, y_l) ~ D_t} (h_t(pi, y_w, y_l) - 1/(2 eta))^2                          [eq. 8, Alg. 1 l. 5]

whose minimiser is exactly the OMD step of eq. 5 (Prop. 6). With tau = eta, or at the first round
(pi_1 = pi_ref), this is IPO with beta = eta on the round's pairs.

Rounds (Alg. 1): every `round_steps` optimizer steps a round starts. It draws `round_prompts`
prompts from the training stream, samples `num_samples` responses to each from the current
policy (rlx.rollout, seeded by (seed, round)), judges them with the `reward` config group (by
default the task's exact-answer checker), and keeps one pair per prompt: the best response
against the worst, only where the best strictly wins (the paper's practice, §4.1). With
`tie_break=length` the judgement is (reward, then shorter wins), so two right answers make a pair
that prefers the concise one; `tie_break=none` judges by reward alone. The frozen reference's and
the current policy's (= pi_t, frozen for the round) log-probs of every pair are computed once and
cached, so pi_t needs no model copy. The round's steps cycle through its pairs,
trainer.micro_batch_size pairs per micro-batch. The round index, its pairs, their cached log-probs
and the position in them are checkpointed: a resumed run continues bit for bit.

Defaults (conf/algo/inpo.yaml) and where they come from:
* tau/eta = 1/3 (paper §4.1: eta = 0.005, tau = eta/3);
* eta = 0.1, not the paper's 0.005: the regression target is 1/(2 eta) nats of summed log-ratio,
  which is 100 nats at 0.005 (8B models, long chat responses). The embedded task's traces are
  ~30 tokens; 1/(2 * 0.1) = 5 nats is the scale at which DPO's beta = 0.1 works on the same base;
* num_samples = 8 (paper §4.1, K = 8); 3 rounds in a 60-step run (round_steps = 20; the paper's
  T = 3); round_prompts = 64 (the paper's 20K prompts per round scaled to the tiny task);
* max_new_tokens, temperature, top_p as algo=grpo's (conf/algo/grpo.yaml);
* logps = sum: the loss is written on sequence log-probs log pi(y|x), and the paper does not say
  its implementation averages per token; the official code was not found, so this stays open
  (`logps=mean` divides every log-prob, policy, reference and pi_t, by the response's tokens).

Deviations, on purpose:
* the judge is a pointwise score (the task's checker or a reward model, best vs worst of K), as
  the paper's BT-reward-model variant, not its pairwise preference model's knockout tournament;
  the length tie-break is rlx's (the checker gives only 0/1);
* pi_t's log-probs are the policy's at the round's start in eval mode (no dropout), as the
  reference's; a round with no kept pair re-draws prompts up to `max_draws` times, then stops
  with an error;
* a pair's responses are the sampled ones decoded to text and tokenised again as a DPO pair
  (completion + EOS, `rlx.data.collate.lm_batch`), so a response cut off by max_new_tokens is
  trained on as if it had ended there;
* the round's prompts are drawn from the training stream as whole micro-batches; the rest of
  the last one drawn is not used;
* the number of optimizer steps per round is fixed (`round_steps`), not epochs over D_t.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, policy_logps, response_logps, reward_metrics
from rlx.algorithms._sampling import score
from rlx.data.collate import IGNORE, prompt_batch
from rlx.data.stream import draw_more
from rlx.errors import RlxError
from rlx.rollout import sample

TIE_BREAKS = ("length", "none")
LOGPS = ("sum", "mean")


def inpo_loss(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, prev_w: Tensor, prev_l: Tensor,
              eta: float, tau: float) -> tuple[Tensor, Tensor]:
    """Per-pair losses [B] (Alg. 1, line 5) and h_t [B] (detached); w = winner, l = loser,
    prev = pi_t, the policy of the round's start."""
    ratio = tau / eta
    h = (policy_w - policy_l) - ratio * (ref_w - ref_l) - (1 - ratio) * (prev_w - prev_l)
    return (h - 1 / (2 * eta)) ** 2, h.detach()


def best_and_worst(rewards: list[float], lengths: list[int], tie_break: str) -> tuple[int, int, bool]:
    """One group's best and worst response (indices) and whether the best strictly beats the
    worst. With tie_break=length a shorter response beats a longer one of equal reward; among
    equal judgements the first is the best and the last the worst."""
    key = [(r, -n if tie_break == "length" else 0) for r, n in zip(rewards, lengths)]
    best = max(range(len(key)), key=lambda i: (key[i], -i))
    worst = min(range(len(key)), key=lambda i: (key[i], -i))
    return best, worst, key[best] > key[worst]


def _seed(seed: int, round_index: int, draw: int) -> int:
    return int.from_bytes(hashlib.sha256(f"inpo/{seed}/{round_index}/{draw}".encode()).digest()[:8], "little") >> 1


class INPO:
    needs_trained_model = True

    def __init__(self, reward, reference=None, eta: float = 0.1, tau: float = 0.1 / 3, round_steps: int = 20,
                 round_prompts: int = 64, num_samples: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, tie_break: str = "length", logps: str = "sum", max_draws: int = 4,
                 max_length: int = 256, seed: int = 0):
        if eta <= 0:
            raise RlxError(f"algo.eta={eta} must be > 0")
        if not 0 <= tau <= eta:
            raise RlxError(f"algo.tau={tau} must be in [0, algo.eta={eta}] (pi_t's weight 1 - tau/eta must be >= 0)")
        if min(round_steps, round_prompts) < 1 or num_samples < 2:
            raise RlxError("algo.round_steps and algo.round_prompts must be >= 1 and algo.num_samples >= 2")
        if tie_break not in TIE_BREAKS:
            raise RlxError(f"unknown algo.tie_break={tie_break!r}; valid: {', '.join(TIE_BREAKS)}")
        if logps not in LOGPS:
            raise RlxError(f"unknown algo.logps={logps!r}; valid: {', '.join(LOGPS)}")
        self.reward, self.eta, self.tau, self.round_steps, self.round_prompts = reward, eta, tau, round_steps, round_prompts
        self.num_samples, self.max_new_tokens, self.temperature, self.top_p = num_samples, max_new_tokens, temperature, top_p
        self.tie_break, self.logps, self.max_draws, self.seed = tie_break, logps, max_draws, seed
        self.pairs = PairBatcher(reference, max_length)  # its tokeniser and frozen reference; not its cache
        self.reference = self.pairs.reference
        # the round: its index, its pairs (texts), their cached [P, 4] summed log-probs
        # (ref_w, ref_l, prev_w, prev_l; prev = pi_t) and the next pair to train on
        self.round, self.data, self.cached, self.pos = -1, [], None, 0
        self.round_metrics: dict[str, float] = {}

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {"round": self.round, "pairs": list(self.data), "cached": self.cached, "pos": self.pos,
                "round_metrics": dict(self.round_metrics)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.round, self.data, self.cached, self.pos = state["round"], list(state["pairs"]), state["cached"], state["pos"]
            self.round_metrics = dict(state["round_metrics"])

    def make_batch(self, examples, state) -> dict:
        round_index = state.step // self.round_steps
        if round_index != self.round:  # the round's first micro-batch: only now are `examples` drawn
            self._start_round(round_index, examples, state)
        size = state.trainer.micro_batch_size if state.trainer is not None else len(examples)
        rows = [(self.pos + i) % len(self.data) for i in range(size)]  # the round's pairs, cycled
        self.pos = (self.pos + size) % len(self.data)
        batch = self.pairs.tokenize([self.data[i] for i in rows], state.tokenizer, state.model.device)
        batch["cached"] = self.cached[torch.tensor(rows)].to(state.model.device)
        batch["num_targets"] = size  # the loss is a mean over pairs
        batch["num_tokens"] = int((batch["labels"][:, 1:] != IGNORE).sum())
        batch["round_metrics"] = {"inpo/round": float(self.round), **self.round_metrics}
        return batch

    @torch.no_grad()
    def _start_round(self, round_index: int, examples, state) -> None:
        """Sample this round's responses from pi_t, judge them, keep the pairs a strict winner
        makes, and cache their log-probs under pi_ref and pi_t."""
        pairs, correct, lengths, judged = [], [], [], 0
        stream = list(examples)
        for draw in range(self.max_draws + 1):
            prompts = []
            while len(prompts) < self.round_prompts:
                stream = stream or draw_more(examples)
                if not stream:
                    break
                prompts.append(stream.pop(0))
            if not prompts:
                break
            new, c, n = self._pairs(prompts, state, _seed(self.seed, round_index, draw))
            pairs, judged = pairs + new, judged + len(prompts)
            correct, lengths = correct + [c], lengths + [n]
            if pairs:
                break
        if not pairs:
            raise RlxError(f"INPO round {round_index}: no prompt's {self.num_samples} samples had a strict winner in "
                           f"{judged} prompts; raise algo.num_samples or algo.temperature, or use algo.tie_break=length")
        device = next(self.reference.parameters()).device
        tok = self.pairs.tokenize(pairs, state.tokenizer, device)
        ref = response_logps(self.reference, tok)[0].cpu()
        was_training = state.model.training
        state.model.eval()  # pi_t as the reference is scored: no dropout
        prev = response_logps(state.model, {k: v.to(state.model.device) for k, v in tok.items()})[0].cpu()
        state.model.train(was_training)
        self.cached = torch.stack([*ref.chunk(2), *prev.chunk(2)], -1)
        self.round, self.data, self.pos = round_index, pairs, 0
        correct, lengths = torch.cat(correct), torch.cat(lengths)
        self.round_metrics = {"inpo/pairs_kept": float(len(pairs)), "inpo/pairs_kept_frac": len(pairs) / judged,
                              "inpo/sample_accuracy": correct.mean().item(),
                              "inpo/sample_len": lengths.mean().item()}

    def _pairs(self, prompts: list[dict], state, seed: int) -> tuple[list[dict], Tensor, Tensor]:
        """The kept pairs, and every sample's checker correctness and length [len(prompts) * K]."""
        model, tok, k = state.model, state.tokenizer, self.num_samples
        rows = [ex for ex in prompts for _ in range(k)]
        batch = prompt_batch([ex["prompt"] for ex in rows], tok, model.device)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        rollout = sample(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=self.max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=self.temperature,
                         top_p=self.top_p, generator=generator)
        rewards, correct, _ = score(rollout, rows, state, self.reward)
        lengths = rollout.lengths.cpu()
        # the text the pair trains on: the response without EOS (lm_batch adds it back)
        texts = tok.batch_decode(rollout.response_ids, skip_special_tokens=True)
        pairs = []
        for g in range(0, len(rows), k):
            best, worst, wins = best_and_worst(rewards[g:g + k].tolist(), lengths[g:g + k].tolist(), self.tie_break)
            if wins:
                pairs.append({**rows[g], "chosen": texts[g + best], "rejected": texts[g + worst]})
        return pairs, correct, lengths.float()

    def loss(self, batch: dict, state):
        chosen, rejected, chosen_counts, rejected_counts = policy_logps(state.model, batch)
        ref_w, ref_l, prev_w, prev_l = batch["cached"].unbind(-1)
        if self.logps == "mean":  # every log-prob per token of its response
            nw, nl = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
            chosen, ref_w, prev_w = chosen / nw, ref_w / nw, prev_w / nw
            rejected, ref_l, prev_l = rejected / nl, ref_l / nl, prev_l / nl
        losses, h = inpo_loss(chosen, rejected, ref_w, ref_l, prev_w, prev_l, self.eta, self.tau)
        loss = losses.mean()
        rewards_w, rewards_l = self.eta * (chosen - ref_w).detach(), self.eta * (rejected - ref_l).detach()
        metrics = {"train/loss": loss.detach(), "inpo/h": h.mean().item(), **batch["round_metrics"],
                   **reward_metrics("inpo", rewards_w, rewards_l)}
        return loss, metrics
