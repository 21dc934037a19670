"""RM: a reward model trained with the Bradley-Terry loss on preference pairs.

    rlx train algo=rm data=reasoning_pairs
    rlx train algo=rm data=reasoning_pairs algo.margin=0.5 algo.center_coef=0.01
    rlx train algo=grpo reward=rm reward.terms.rm.checkpoint=outputs/<run>/checkpoints/last   # use it

For a pair (prompt x, chosen y_c, rejected y_r) with scalar rewards r_c = r(x, y_c) and
r_r = r(x, y_r), the per-pair loss is (Bradley & Terry, 1952; Ouyang et al., 2022, eq. 1)

    −log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)²

`margin` is Llama 2's preference-strength margin (one value for every pair here), and
`center_coef` is TRL's `center_rewards_coefficient` (Eisenstein et al., 2023): it keeps the
rewards near zero, which the Bradley-Terry loss alone leaves free (it only sees differences).
The loss is the mean over pairs (`num_targets` counts pairs). `rm/accuracy` is the fraction of
pairs with r_c > r_r (TRL's `accuracy`); `rm/margin` the mean r_c − r_r.

Deviation from TRL's RewardTrainer / OpenRLHF (AutoModelForSequenceClassification, a separate
`score` head, Linear(hidden, 1)): the loop trains and saves `state.model`, an ordinary causal
LM built by the `model` group, and its optimizer already holds that model's parameters. So the
scalar head is not a new module but a row of the LM head that is already there ("a designated
logit"):

    r(x, y) = logits[last non-pad position of prompt + response + EOS, reward_token_id]

with `reward_token_id` the tokenizer's EOS id. This is exactly a bias-free linear head on the
last hidden state, `w · h`, whose weight w is the EOS row of `lm_head` (tied to the EOS
embedding in the tiny model, so the embedding trains with it): the same function class as
TRL's `score` head (also bias-free), saved
and loaded as a plain causal LM (`save_pretrained` / `rlx.models.hf`). The price: the model's
next-token distribution is no longer meaningful after RM training (its perplexity and
generation-based eval are not the point of this run), and the head starts from the LM's EOS
logit rather than from zero.

Sequences are tokenised as in SFT and DPO (`rlx.data.collate.lm_batch`): prompt + response +
EOS, right padded, truncated at `max_length` (a truncated row is scored at its last kept token,
as TRL does).

SoliReward's BT with win-tie (`algo.loss=bt_ties`)
--------------------------------------------------

    rlx train algo=rm algo.loss=bt_ties data.ties=0.25
    rlx train algo=rm algo.loss=bt_ties data.ties=0.25 data.cross_prompt=true algo.bce_coef=0.1

"SoliReward: Mitigating Susceptibility to Reward Hacking and Annotation Noise in Video
Generation Reward Models" (Lian et al., 2025, arXiv 2512.22170; official code
lian700/SoliReward, `solireward/trainer/loss.py`). Items carry Pass/Fail labels q; a pair of
different labels is a win pair (item 1 passes), a pair of equal labels a tie (the data marks it:
"tie", see `rlx.data.preferences`). With d = r_1 − r_2 and margin m:

    win:  L_BT  = −log σ(d − m)         (label smoothing ε: −(1−ε) log σ(d − m) − ε log σ(−d − m))
    tie:  L_BTT = −log σ(d − m) − log σ(−d − m) = softplus(m − d) + softplus(m + d)
    item: L_BCE = BCEWithLogits(r, q)    (a pointwise anchor on the Pass/Fail label)
    L = mean over all pairs (win and tie) of [bt_coef·L_BT·1{win} + tie_coef·L_BTT·1{tie}
        + bce_coef·(L_BCE(r_1) + L_BCE(r_2))/2 (+ center_coef·(r_1 + r_2)²)]

L_BTT is symmetric and convex in d, smallest at d = 0, and its gradient on (r_1, r_2) is equal
and opposite: it pulls the two scores of a tie together without moving their mean, which
compresses the spread of the passing scores (the paper's remedy for a policy chasing a few
top-scoring samples). `rm/pass_std`, the standard deviation of the scores of the passing items in
the micro-batch, tracks that spread (the note's reward-hacking metric); `rm/tie_gap` is the mean
|d| over tie pairs. `rm/accuracy`, `rm/margin`, `rm/chosen` and `rm/rejected` are over win pairs
only (a micro-batch without one counts 0). On data with ties, `loss=bt` skips the tie pairs (it
has no loss for them, and reading one as "chosen beats rejected" would be noise): the same win
pairs without the tie term, the baseline bt_ties is measured against.

Defaults: bt_coef = tie_coef = 1, bce_coef = 0, ε = 0 (the official train script). Margin: the
script's m = 3.0 assumes a free-scale score head; here the score is the EOS logit of a causal LM,
which starts at the LM's logit scale and is BT-trained without a margin, so rlx keeps m = 0, the
low end of the [0, 1] the paper note suggests for LLM RMs (also what keeps `loss=bt` unchanged).
With no tie pairs, m = 0, ε = 0 and no BCE, `bt_ties` is the plain BT loss bit for bit.

Deviations: (1) the score head is the designated EOS logit above, not the paper's HPQA head (a
video-specific attention head); (2) a pair is a tie when the data says so, not by comparing
label values in the loss (the same pairs, as the data writes "tie" iff the labels are equal);
(3) ε smooths only the BT term, not the BCE targets as the official code also does; (4) the
BCE anchor is averaged per pair, (L_BCE(r_1) + L_BCE(r_2))/2, which over a batch is the official
mean over all 2B items; (5) `center_coef` (TRL's) applies to tie pairs as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.data.collate import lm_batch, pair_rows
from rlx.errors import RlxError


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0,
                       center_coef: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair losses [B] and the pairwise accuracy (a scalar: fraction with r_c > r_r)."""
    # logsigmoid is the stable form of log(σ(x)) for large |x|
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    accuracy = (r_chosen > r_rejected).float().mean().detach()
    return losses, accuracy


LOSSES = ("bt", "bt_ties")


def win_tie_loss(r1: Tensor, r2: Tensor, tie: Tensor, margin: float = 0.0, label_smoothing: float = 0.0,
                 bt_coef: float = 1.0, tie_coef: float = 1.0) -> Tensor:
    """Per-pair SoliReward losses [B]: bt_coef·L_BT on win pairs (item 1 the better), tie_coef·L_BTT
    on ties (`tie`, a bool [B]); see the module docstring."""
    d = r1 - r2
    win = -F.logsigmoid(d - margin)
    if label_smoothing:
        win = (1 - label_smoothing) * win - label_smoothing * F.logsigmoid(-d - margin)
    # where, not a 0/1 mask product: an unused branch's inf can never turn into a NaN
    return torch.where(tie, tie_coef * (-F.logsigmoid(d - margin) - F.logsigmoid(-d - margin)), bt_coef * win)


def pointwise_bce(r1: Tensor, r2: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
    """[B]: the mean of the two items' BCE-with-logits against their Pass (1) / Fail (0) labels."""
    bce = F.binary_cross_entropy_with_logits
    return (bce(r1, q1.float(), reduction="none") + bce(r2, q2.float(), reduction="none")) / 2


def sequence_reward(model, input_ids: Tensor, attention_mask: Tensor, reward_token_id: int) -> Tensor:
    """[N] float32: the logit of `reward_token_id` at each row's last non-pad position.

    Rows are right padded; the last position is found from `attention_mask` (not from the pad
    id, which may equal EOS)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [N, T, V]
    last = attention_mask.sum(-1).long() - 1  # [N]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return hidden[rows, last, reward_token_id].float()


class RM:
    needs_trained_model = True

    def __init__(self, max_length: int = 256, margin: float = 0.0, center_coef: float = 0.0, loss: str = "bt",
                 label_smoothing: float = 0.0, bt_coef: float = 1.0, tie_coef: float = 1.0, bce_coef: float = 0.0):
        if max_length < 2:
            raise RlxError(f"algo.max_length={max_length} must be >= 2")
        if center_coef < 0:
            raise RlxError(f"algo.center_coef={center_coef} must be >= 0")
        if loss not in LOSSES:
            raise RlxError(f"unknown algo.loss={loss!r}: choose from {', '.join(LOSSES)}")
        if not 0.0 <= label_smoothing < 0.5:
            raise RlxError(f"algo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if min(bt_coef, tie_coef, bce_coef) < 0:
            raise RlxError(f"algo.bt_coef, tie_coef and bce_coef ({bt_coef}, {tie_coef}, {bce_coef}) must be >= 0")
        self.max_length, self.margin, self.center_coef = max_length, margin, center_coef
        self.loss_name, self.label_smoothing = loss, label_smoothing
        self.bt_coef, self.tie_coef, self.bce_coef = bt_coef, tie_coef, bce_coef

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = lm_batch(pair_rows(examples, ties=True), state.tokenizer, self.max_length)
        batch = {k: batch[k].to(state.model.device) for k in ("input_ids", "attention_mask")}
        device = state.model.device
        # Plain preference pairs carry no labels: their chosen side passes, their rejected side fails.
        batch["tie"] = torch.tensor([bool(ex.get("tie", False)) for ex in examples], device=device)
        batch["chosen_pass"] = torch.tensor([bool(ex.get("chosen_pass", True)) for ex in examples], device=device)
        batch["rejected_pass"] = torch.tensor([bool(ex.get("rejected_pass", False)) for ex in examples], device=device)
        # bt_ties: the loss is a mean over all pairs (win and tie); bt: over the win pairs, as it has
        # no loss for a tie (at least 1, so a micro-batch of ties alone weighs in at zero loss)
        counted = len(examples) if self.loss_name == "bt_ties" else sum(not ex.get("tie", False) for ex in examples)
        batch["num_targets"] = max(counted, 1)
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # chosen + rejected tokens
        return batch

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def loss(self, batch: dict, state):
        rewards = sequence_reward(state.model, batch["input_ids"], batch["attention_mask"],
                                  state.tokenizer.eos_token_id)
        chosen, rejected = rewards.chunk(2)
        tie = batch["tie"]
        losses = win_tie_loss(chosen, rejected, tie, self.margin, self.label_smoothing, self.bt_coef, self.tie_coef)
        if self.center_coef:
            losses = losses + self.center_coef * (chosen + rejected) ** 2
        if self.bce_coef:
            losses = losses + self.bce_coef * pointwise_bce(chosen, rejected, batch["chosen_pass"],
                                                            batch["rejected_pass"])
        if self.loss_name == "bt" and tie.any():
            losses = losses[~tie]  # plain BT skips ties: the same win pairs, without the tie term
        loss = losses.mean() if losses.numel() else rewards.sum() * 0.0
        with torch.no_grad():
            win = ~tie
            passing = torch.cat([chosen[batch["chosen_pass"]], rejected[batch["rejected_pass"]]])
            metrics = {
                "train/loss": loss.detach(),
                "rm/accuracy": _mean((chosen > rejected)[win].float()),
                "rm/margin": _mean((chosen - rejected)[win]),
                "rm/chosen": _mean(chosen[win]),
                "rm/rejected": _mean(rejected[win]),
                "rm/pass_std": passing.std().item() if passing.numel() > 1 else 0.0,
            }
            if self.loss_name == "bt_ties":
                metrics["rm/tie_gap"] = _mean((chosen - rejected)[tie].abs())
        return loss, metrics


def _mean(x: Tensor) -> float:
    return x.mean().item() if x.numel() else 0.0  # a micro-batch without such pairs counts 0
