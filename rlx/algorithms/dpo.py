"""DPO: direct preference optimisation (Rafailov et al., 2023), with cDPO label smoothing and IPO.

    rlx train algo=dpo data=reasoning_pairs
    rlx train algo=dpo data=reasoning_pairs algo.label_smoothing=0.1     # cDPO
    rlx train algo=dpo data=reasoning_pairs algo.loss_type=ipo algo.beta=0.5

For a pair (prompt x, chosen y_c, rejected y_r), with log-probs log π(y|x) of the trained policy
and log π_ref(y|x) of a frozen reference, the log-ratio difference is

    h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))

and the per-pair losses are

    sigmoid (DPO, eq. 7):     −log σ(β·h)
    cDPO (label smoothing ε): −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
    ipo (Azar et al., 2023):  (h − 1/(2β))²

The implicit rewards β·(log π(y|x) − log π_ref(y|x)) of both sides are logged (`dpo/*`).

Conventions, following TRL's DPOTrainer:
* sigmoid sums the log-probs over the response tokens; IPO averages them per token
  (TRL's choice, confirmed with the IPO authors; OpenRLHF's IPO sums instead). The logged
  rewards use the same (summed or averaged) log-probs as the loss;
* the response is the completion plus EOS, the prompt is masked (`rlx.data.collate.lm_batch`),
  as in SFT;
* the loss is the mean over pairs: `num_targets` counts pairs, so gradient accumulation
  weights micro-batches by pairs.

Deviation: the reference is a second copy of the model built from the same config
(`algo.reference='${model}'`, the default), and its log-probs are computed once per pair and
cached in memory (TRL's `precompute_ref_log_probs`, but lazily): later epochs reuse them. The
cache is not checkpointed; a resumed run recomputes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.data.collate import IGNORE, lm_batch, pair_rows
from rlx.errors import RlxError

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the chosen and rejected implicit rewards [B] (detached).

    The log-probs are per sequence: summed for sigmoid, per-token averaged for IPO (the caller's
    choice; see the module docstring)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # logsigmoid is the stable form of log(σ(x)) for large |x|
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise RlxError(f"unknown algo.loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def response_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each row's labelled tokens [N] and how many there are [N]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def _pair_key(example: dict) -> tuple[str, str, str]:
    return example["prompt"], example["chosen"], example["rejected"]


class DPO:
    needs_trained_model = True

    def __init__(self, reference=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, max_length: int = 256):
        if reference is None:
            raise RlxError("DPO needs a frozen reference model: set algo.reference='${model}' (conf/algo/dpo.yaml does)")
        if loss_type not in LOSS_TYPES:
            raise RlxError(f"unknown algo.loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise RlxError(f"algo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if label_smoothing > 0 and loss_type != "sigmoid":
            raise RlxError("algo.label_smoothing (cDPO) applies to loss_type=sigmoid only")
        self.beta, self.loss_type, self.label_smoothing, self.max_length = beta, loss_type, label_smoothing, max_length
        self.reference = reference.model.eval().requires_grad_(False)
        self.ref_cache: dict[tuple[str, str, str], tuple[float, float]] = {}  # key -> (chosen, rejected) summed

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}  # the reference cache is recomputed on resume

    def load_state_dict(self, state: dict) -> None: ...

    # ------------------------------------------------------------------ batch

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = self._tokenize(examples, state.tokenizer, state.model.device)
        ref = self._reference_logps(examples, state)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.to(state.model.device).unbind(-1)
        batch["num_targets"] = len(examples)  # the loss is a mean over pairs
        batch["num_tokens"] = int((batch["labels"][:, 1:] != IGNORE).sum())  # chosen + rejected targets
        return batch

    def _tokenize(self, examples: list[dict], tokenizer, device) -> dict:
        """Chosen rows then rejected rows, in one right-padded batch for a single forward."""
        return {k: v.to(device) for k, v in lm_batch(pair_rows(examples), tokenizer, self.max_length).items()}

    @torch.no_grad()
    def _reference_logps(self, examples: list[dict], state) -> Tensor:
        """[B, 2] summed reference log-probs (chosen, rejected), computed once per pair."""
        keys = [_pair_key(ex) for ex in examples]
        missing = list({key: ex for key, ex in zip(keys, examples) if key not in self.ref_cache}.items())  # deduped
        if missing:
            device = next(self.reference.parameters()).device
            batch = self._tokenize([ex for _, ex in missing], state.tokenizer, device)
            chosen, rejected = response_logps(self.reference, batch)[0].cpu().chunk(2)
            for (key, _), c, r in zip(missing, chosen.tolist(), rejected.tolist()):
                self.ref_cache[key] = (c, r)
        return torch.tensor([self.ref_cache[key] for key in keys])

    # ------------------------------------------------------------------ loss

    def loss(self, batch: dict, state):
        logps, counts = response_logps(state.model, batch)
        ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        if self.loss_type == "ipo":  # TRL: IPO compares per-token averages, not sums
            counts = counts.clamp(min=1)
            logps, ref = logps / counts, ref / counts
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                            self.loss_type, self.label_smoothing)
        loss = losses.mean()
        margin = chosen_rewards - rejected_rewards
        return loss, {
            "train/loss": loss.detach(),
            "dpo/reward_margin": margin.mean().item(),
            "dpo/reward_accuracy": (margin > 0).float().mean().item(),
            "dpo/chosen_reward": chosen_rewards.mean().item(),
            "dpo/rejected_reward": rejected_rewards.mean().item(),
        }
