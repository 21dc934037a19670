"""NPO: negative preference optimization for unlearning, with its retain-loss variants, and the
gradient-ascent baseline it fixes.

    rlx train algo=npo                                   # NPO-RT (retain NLL), from the SFT base
    rlx train algo=npo algo.retain=none                  # NPO alone
    rlx train algo=npo algo.retain=kl                    # NPO-KL
    rlx train algo=npo algo.loss=ga                      # gradient ascent (+ retain NLL: "GradDiff")
    rlx train algo=npo data.forget_terms=[3,4] algo.beta=0.5

Paper: "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
Zhang, Lin, Bai, Mei (COLM 2024), arXiv 2404.05868; official code licong-lin/negative-preference-
optimization (TOFU/dataloader.py), maintained reimplementation locuslab/open-unlearning
(src/trainer/unlearn/npo.py). The equations as the paper states them (§3; their numbers in the
paper are not recorded here), for a forget example (x, y) and a frozen reference π_ref (the
model before unlearning):

    u = log π_θ(y|x) − log π_ref(y|x)                      (summed over the answer tokens)
    L_NPO = (2/β) · E_forget[ log(1 + (π_θ/π_ref)^β) ] = −(2/β) · E_forget[ log σ(−β u) ]
    ∇L_NPO = E_forget[ 2σ(β u) · ∇ log π_θ(y|x) ]        (GA's gradient, weighted by 2σ(βu) ∈ (0, 2))

NPO is DPO's sigmoid loss with the chosen side removed (h = −u), times 2/β; L_NPO ≥ 0 and → 0
as u → −∞. As β → 0, L_NPO − (2/β)·ln 2 → u, and the gradient weight → 1: gradient ascent
(`algo.loss=ga`), whose loss here is E_forget[u], i.e. −NLL_θ shifted by the constant NLL_ref
(same gradient as ascending the NLL; 0 at the start, like u). The total is

    L = forget_coef · L_forget + retain_coef · L_retain                 (γ and α in open-unlearning)

    retain=none   NPO        L_retain = 0
    retain=nll    NPO-RT     L_retain = E_retain[ token-mean NLL_θ of the retain answer ]
    retain=kl     NPO-KL     L_retain = E_retain[ token-mean over the answer of KL(π_ref(·|ctx) ‖ π_θ(·|ctx)) ]

Defaults: β = 0.1 and both coefficients 1.0 (the official TOFU config and open-unlearning's);
retain=nll, because open-unlearning's default `NPO` trainer includes the retain NLL term (α = 1),
which is the paper's NPO-RT. LR and steps come from `/recipe: dpo_from_sft` (1e-5 x 60, the
official config's lr 1e-5).

Data: each example pairs a forget item with a retain item (`data=reasoning_unlearn`,
rlx/data/unlearn.py); `num_targets` counts forget examples, so the forget term is a mean over
them and gradient accumulation weights micro-batches by them.

Deviations from the paper / official code:
* the KL form: the official code takes `F.kl_div(log_softmax θ, log_softmax ref, log_target=True,
  reduction="batchmean")` over the flattened (B·T, V) logits, i.e. KL(ref ‖ θ) summed over the
  vocabulary and averaged over *every* position, prompt and padding included (open-unlearning's
  `compute_kl_divergence` is the same call on its own inputs). rlx keeps the direction KL(ref ‖ θ)
  (the reference's distribution is the target) but averages over the retain answer's tokens only
  (the next-token positions the NLL term is taken on), per example, so padding never counts and
  the term does not depend on how rows are padded together;
* the retain NLL is each retain answer's token-mean NLL, averaged over the examples. HF's
  `model.loss` (the official code) pools the tokens of the whole device batch; the two are equal
  when the answers have the same length, and the per-example mean keeps 1 x 8 and 8 x 1
  accumulation the same gradient. The forget term uses *summed* log-probs, as the paper (a
  token mean there would change the effective β);
* the reference's summed log-prob of each forget example is computed once and cached (keyed by
  prompt and answer; not checkpointed: a resumed run recomputes it, the reference being frozen).
  The KL variant needs the reference's full next-token distributions on the retain answers,
  which are not cached: one reference forward of the retain rows per micro-batch;
* each forget item's retain partner is drawn once when the data is built (seeded), where the
  official dataloader draws a new one each time an item is fetched;
* the answer is the completion plus EOS with the prompt masked (`rlx.data.collate.lm_batch`),
  as in rlx's SFT and DPO; the official code masks the question the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.algorithms._pairs import frozen
from rlx.data.collate import IGNORE, lm_batch
from rlx.errors import RlxError

LOSSES = ("npo", "ga")
RETAINS = ("none", "nll", "kl")


def npo_loss(log_ratio: Tensor, beta: float) -> Tensor:
    """Per-example −(2/β)·log σ(−β u) = (2/β)·softplus(β u) [B]; `log_ratio` is u, summed over tokens."""
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)


def npo_weight(log_ratio: Tensor, beta: float) -> Tensor:
    """The weight 2σ(β u) that NPO's gradient puts on GA's, per example (1 at u = 0)."""
    return 2.0 * torch.sigmoid(beta * log_ratio)


def ga_loss(log_ratio: Tensor) -> Tensor:
    """Gradient ascent per example: u = −NLL_θ + NLL_ref, the NPO loss's β → 0 limit less (2/β)·ln 2."""
    return log_ratio


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position log-prob of the next labelled token [N, T-1] and the mask of labelled positions."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def answer_kl(policy_logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row mean over the answer's next-token positions of KL(π_ref ‖ π_θ), summed over the vocabulary [N]."""
    mask = labels[:, 1:] != IGNORE
    ref_logp = ref_logits[:, :-1].float().log_softmax(-1)
    policy_logp = policy_logits[:, :-1].float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def forget_key(example: dict) -> tuple[str, str]:
    return example["prompt"], example["completion"]


class NPO:
    needs_trained_model = True

    def __init__(self, reference=None, beta: float = 0.1, loss: str = "npo", retain: str = "nll",
                 forget_coef: float = 1.0, retain_coef: float = 1.0, max_length: int = 256):
        if loss not in LOSSES:
            raise RlxError(f"unknown algo.loss={loss!r}; valid: {', '.join(LOSSES)}")
        if retain not in RETAINS:
            raise RlxError(f"unknown algo.retain={retain!r}; valid: {', '.join(RETAINS)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if forget_coef < 0 or retain_coef < 0:
            raise RlxError(f"algo.forget_coef={forget_coef} and algo.retain_coef={retain_coef} must be >= 0")
        self.beta, self.loss_name, self.retain = beta, loss, retain
        self.forget_coef, self.retain_coef, self.max_length = forget_coef, retain_coef, max_length
        self.reference = frozen(reference, "a frozen reference model")
        self.cache: dict[tuple[str, str], float] = {}  # forget (prompt, completion) -> reference summed log-prob

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}  # the reference cache is recomputed on resume

    def load_state_dict(self, state: dict) -> None: ...

    def make_batch(self, examples: list[dict], state) -> dict:
        if examples and not {"forget", "retain"} <= set(examples[0]):
            raise RlxError("NPO trains on forget/retain pairs, and the data has fields "
                           f"{sorted(examples[0])}: add data=reasoning_unlearn")
        forget = [ex["forget"] for ex in examples]
        rows = forget + ([ex["retain"] for ex in examples] if self.retain != "none" else [])
        device = state.model.device
        batch = {k: v.to(device) for k, v in lm_batch(rows, state.tokenizer, self.max_length).items()}
        batch["ref_logps"] = self.reference_logps(forget, state).to(device)
        batch["num_targets"] = len(examples)  # the forget term is a mean over forget examples
        batch["num_tokens"] = int((batch["labels"][:, 1:] != IGNORE).sum())  # forget + retain targets
        return batch

    @torch.no_grad()
    def reference_logps(self, forget: list[dict], state) -> Tensor:
        """[B] summed reference log-probs of the forget answers, computed once per example."""
        keys = [forget_key(ex) for ex in forget]
        missing = list({key: ex for key, ex in zip(keys, forget) if key not in self.cache}.items())  # deduped
        if missing:
            device = next(self.reference.parameters()).device
            batch = {k: v.to(device) for k, v in lm_batch([ex for _, ex in missing], state.tokenizer,
                                                         self.max_length).items()}
            logits = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps = token_logps(logits, batch["labels"])[0].sum(-1).cpu()
            for (key, _), value in zip(missing, logps.tolist()):
                self.cache[key] = value
        return torch.tensor([self.cache[key] for key in keys])

    def loss(self, batch: dict, state):
        n = batch["ref_logps"].shape[0]
        logits = state.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logps(logits, batch["labels"])
        log_ratio = logp[:n].sum(-1) - batch["ref_logps"]
        per_example = npo_loss(log_ratio, self.beta) if self.loss_name == "npo" else ga_loss(log_ratio)
        forget = per_example.mean()
        metrics = {"npo/forget_loss": forget.detach(), "npo/log_ratio": log_ratio.detach().mean(),
                   "npo/forget_nll": -logp[:n].sum(-1).detach().mean(),
                   "npo/weight": npo_weight(log_ratio.detach(), self.beta).mean()}
        retain = torch.zeros((), device=forget.device)
        if self.retain == "nll":
            counts = mask[n:].sum(-1).clamp(min=1)
            retain = (-logp[n:].sum(-1) / counts).mean()
        elif self.retain == "kl":
            with torch.no_grad():
                ref_device = next(self.reference.parameters()).device
                ref_logits = self.reference(input_ids=batch["input_ids"][n:].to(ref_device),
                                            attention_mask=batch["attention_mask"][n:].to(ref_device)).logits
            retain = answer_kl(logits[n:], ref_logits.to(logits.device), batch["labels"][n:]).mean()
        if self.retain != "none":
            metrics["npo/retain_loss"] = retain.detach()
        loss = self.forget_coef * forget + self.retain_coef * retain
        return loss, {"train/loss": loss.detach(), **metrics}
