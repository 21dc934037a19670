"""SparsePO: preference optimisation with token-level sparse masks on the reward and KL terms
(Christopoulou et al., "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks",
arXiv 2410.05102; official code huawei-noah/HEBO, folder SparsePO/, a TRL fork).

    rlx train algo=sparsepo                                   # learned common mask (sparse-common)
    rlx train algo=sparsepo algo.independent=true             # separate reward and KL heads (sparse-indp)
    rlx train algo=sparsepo algo.mask=activation              # reference-activation mask (MaPO)
    rlx train algo=sparsepo algo.mask=ones                    # TDPO-1
    rlx train algo=sparsepo algo.mask=ones algo.mask_on_kl=false   # DPO exactly
    rlx train algo=sparsepo algo.l1_reward=0.001 algo.l1_kl=0.001  # the HH sparse-common setting

Per response token t of a completion y (prompt and padding masked by lm_t), with the frozen
reference pi_ref run at loss time:

    r_t(y) = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)          token log-ratio
    k_t(y) = KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t))                     full-vocab token KL
    U(y)   = sum_t lm_t m_u,t(y) r_t(y),     S(y) = sum_t lm_t m_d,t(y) k_t(y)
    L      = -log sigma(beta [U(y_w) - U(y_l) + S(y_w) - S(y_l)])
             + lambda_u (||m_u(y_w) lm||_1 + ||m_u(y_l) lm||_1) + lambda_d (||m_d(y_w) lm||_1 + ||m_d(y_l) lm||_1)

(the paper's SparsePO objective, sec. 3, built on TDPO's token-level form). The sign: the
official trainer keeps -k_t, forms d = sum m_d(-k)_w - sum m_d(-k)_l and uses u - d, which is
U_w - U_l + S_w - S_l. With m_u = m_d = 1 this is TDPO-1 (u - delta, delta = S_l - S_w); with the
KL term off and m_u = 1 it is DPO (eq. 7 of arXiv 2305.18290) exactly.

Mask sources (`algo.mask`):
* `activation` (the paper's reference-activation mask, "MaPO" in the code, activation_hook=all,
  activation_mapping=zn_rescale): forward hooks on every decoder layer's `mlp` and `self_attn`
  of the reference, its residual stream (the hidden states after each layer) and its logits; each
  tensor is averaged over its last dimension, z-normalised over the response tokens of its row,
  min-max rescaled to [0, 1], averaged within its type, then across the four types. Detached;
  used as both m_u and m_d.
* `learned` (SparsePO, mask_model=simple_all): per layer l (embeddings excluded),
  LayerNorm(h_l) -> Linear(d, 1) -> ReLU -> dropout, the L outputs concatenated, then a mixer
  Linear(L, 1, no bias) -> ReLU -> dropout, on the reference's hidden states. m_t >= 0, unbounded
  above. One common head (`independent=false`, sparse-common) or separate reward and KL heads
  (`independent=true`, sparse-indp). The heads are trained with the policy (`param_groups()`,
  own weight decay `mask_weight_decay`) and checkpointed (`state_dict()`); their init is seeded
  (`mask_seed`) so two runs are identical.
* `ones`: m = 1 everywhere (TDPO-1, or DPO with `mask_on_kl=false`).

The activations and hidden states at position t-1 (those that predict token t) give token t's
mask, as the official code's `reference_states[l][:, :-1]`.

With common learned masks and both masks on, the official code halves lambda_u and lambda_d so the
one mask's L1 is not counted twice; rlx does the same (the L1 term is then (lambda_u + lambda_d)/2
times the mask's norm; for lambda_u = lambda_d = 0.001 and norms 2 + 2 it is 0.004).

Defaults: beta 0.1 (the HH rows of the official README; IMDB and TL;DR use 0.8), mask=learned
common, mask_dropout 0.01, mask_on_reward and mask_on_kl true, L1 coefficients 0, and
mask_weight_decay 0.01 (the official config's defaults and README). The LR comes from the DPO
recipe (conf/recipe/dpo_from_sft.yaml); the paper's 5e-7..1e-4 are for other models.

Logged: the loss, `reward_metrics("sparsepo", beta U_w, beta U_l)` (the masked implicit rewards),
SeqKL of chosen and rejected (sum_t lm k_t, unmasked), and each mask's sparsity (fraction of exact
zeros over the response tokens) for chosen and rejected.

Deviations from the paper / official code:
* `mask_on_kl=false` drops the KL term (m_d = 0), so that `mask=ones` with it is DPO; the official
  trainer instead keeps the KL term unmasked (m_d = 1). `kl_without_mask=full` gives the official
  behaviour. `mask_on_reward=false` leaves the reward unmasked (m_u = 1), as the official code;
* the reward metrics are beta U (masked log-ratio sums); the official trainer logs beta (U - S);
* the activation mask's z-normalisation uses the population std over the row's response tokens
  (the official code: torch.std, unbiased, in float16, + 1e-12); it cancels in the min-max rescale
  anyway. A row whose hooked scalar is constant over its tokens maps to 0 (the official code would
  divide 0 by 0);
* the activation mask hooks transformers' Llama layout (`model.model.layers[i].mlp / .self_attn`)
  instead of the official per-architecture model forks (GPT-2, GPT-NeoX, GPT-J, GPTBigCode); another
  architecture is one clear error;
* the L1 penalty applies to learned masks only (an activation or all-ones mask is detached, so its
  L1 is a constant): a nonzero l1_* with another mask is an error;
* the full-vocab KL is computed in float32 over [2B, T, V] at once, not chunked: fine for the tiny
  model's 100-token vocabulary, O(B T V) memory for a large one;
* the heads' LayerNorm uses PyTorch's eps 1e-5 (the official code takes the model config's
  layer_norm_eps, which Llama configs lack);
* `mask_lr` (default null: the optimizer's) is rlx's addition; the official heads share the LR.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlx.algorithms._pairs import PairBatcher, reward_metrics
from rlx.data.collate import IGNORE
from rlx.errors import RlxError

MASKS = ("learned", "activation", "ones")
KL_WITHOUT_MASK = ("none", "full")


# ---------------------------------------------------------------------------- pure functions


def token_terms(policy_logits: Tensor, reference_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token log-probs of the labels under the policy and the reference, and the full-vocab
    KL(pi_ref || pi_theta), all [N, T] float32, for logits [N, T, V] already aligned with labels [N, T]."""
    logp = policy_logits.float().log_softmax(-1)
    ref_logp = reference_logits.float().log_softmax(-1)
    index = labels.clamp(min=0).unsqueeze(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return logp.gather(-1, index).squeeze(-1), ref_logp.gather(-1, index).squeeze(-1), kl


def masked_sums(policy_logps: Tensor, reference_logps: Tensor, kl: Tensor, reward_mask: Tensor, kl_mask: Tensor,
                valid: Tensor) -> tuple[Tensor, Tensor]:
    """U = sum_t lm m_u r_t and S = sum_t lm m_d k_t per row [N]. U is written as two sums, so with
    m_u = 1 it is the summed policy log-prob minus the summed reference one, as DPO's."""
    valid = valid.to(policy_logps.dtype)
    u = (reward_mask * policy_logps * valid).sum(-1) - (reward_mask * reference_logps * valid).sum(-1)
    return u, (kl_mask * kl * valid).sum(-1)


def sparsepo_loss(u_chosen: Tensor, u_rejected: Tensor, s_chosen: Tensor, s_rejected: Tensor, beta: float) -> Tensor:
    """Per-pair -log sigma(beta [U_w - U_l + S_w - S_l]) [B]."""
    return -F.logsigmoid(beta * (u_chosen - u_rejected + s_chosen - s_rejected))


def l1_norms(mask: Tensor, valid: Tensor) -> Tensor:
    """||m lm||_1 per row [N]."""
    return (mask * valid).abs().sum(-1)


def zn_rescale(values: Tensor, valid: Tensor) -> Tensor:
    """One hook's per-token scalars [N, T] -> [0, 1]: z-normalised over each row's valid tokens,
    then min-max rescaled over them (min exactly 0, max exactly 1; a constant row gives 0).
    Invalid positions are 0."""
    valid = valid.bool()
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    x = values.float()
    mean = (x * valid).sum(-1, keepdim=True) / count
    std = (((x - mean) ** 2) * valid).sum(-1, keepdim=True).div(count).sqrt()
    z = torch.where(std > 0, (x - mean) / std.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    low = z.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    high = z.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    span = high - low
    out = torch.where(span > 0, (z - low) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(z))
    return out * valid


def activation_map(hooks: dict[str, list[Tensor]], valid: Tensor) -> Tensor:
    """MaPO's mask: each hooked tensor [N, T, *] averaged over its last dim and rescaled
    (`zn_rescale`), averaged within its type, then across types. [N, T] in [0, 1], detached."""
    per_type = [torch.stack([zn_rescale(h.float().mean(-1), valid) for h in tensors]).mean(0)
                for tensors in hooks.values()]
    return torch.stack(per_type).mean(0).detach()


# ---------------------------------------------------------------------------- the learned mask


class MaskHead(nn.Module):
    """SparsePO's `simple_all` mask: per layer LayerNorm -> Linear(d, 1) -> ReLU -> dropout, then a
    mixer Linear(L, 1, no bias) -> ReLU -> dropout. Output >= 0, unbounded above. PyTorch's default
    init, as the official code: a head can start dead (all zeros: no gradient to the policy or to it)."""

    def __init__(self, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)  # one, shared by the layers, as the official SimpleMaskAllLayers
        self.layers = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: list[Tensor]) -> Tensor:
        """Hidden states [N, T, d], one per layer -> [N, T]."""
        per_layer = [self.dropout(F.relu(lin(self.norm(h.float())))) for lin, h in zip(self.layers, hidden)]
        return self.dropout(F.relu(self.mixer(torch.cat(per_layer, -1)))).squeeze(-1)


def decoder_layers(model) -> list:
    """The decoder layers of a transformers Llama-layout model (model.model.layers[i] with .mlp and
    .self_attn), for the activation mask's hooks."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer, "self_attn") for layer in layers):
        raise RlxError(f"algo.mask=activation hooks model.model.layers[i].mlp/.self_attn (Llama layout); "
                       f"{type(model).__name__} has no such layers: use algo.mask=learned or ones")
    return list(layers)


# ---------------------------------------------------------------------------- the algorithm


class SparsePO:
    needs_trained_model = True

    def __init__(self, reference=None, beta: float = 0.1, mask: str = "learned", independent: bool = False,
                 mask_on_reward: bool = True, mask_on_kl: bool = True, kl_without_mask: str = "none",
                 l1_reward: float = 0.0, l1_kl: float = 0.0, mask_dropout: float = 0.01,
                 mask_weight_decay: float = 0.01, mask_lr: float | None = None, mask_seed: int = 0,
                 max_length: int = 256):
        if mask not in MASKS:
            raise RlxError(f"unknown algo.mask={mask!r}; valid: {', '.join(MASKS)}")
        if kl_without_mask not in KL_WITHOUT_MASK:
            raise RlxError(f"unknown algo.kl_without_mask={kl_without_mask!r}; valid: {', '.join(KL_WITHOUT_MASK)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if l1_reward < 0 or l1_kl < 0:
            raise RlxError(f"algo.l1_reward={l1_reward} and algo.l1_kl={l1_kl} must be >= 0")
        if (l1_reward or l1_kl) and mask != "learned":
            raise RlxError(f"algo.l1_reward / l1_kl apply to algo.mask=learned only (a {mask} mask is fixed)")
        if independent and mask != "learned":
            raise RlxError("algo.independent (separate reward and KL heads) applies to algo.mask=learned only")
        if not mask_on_reward and not mask_on_kl and mask != "ones":
            raise RlxError(f"algo.mask={mask} with mask_on_reward=false and mask_on_kl=false masks nothing")
        if not 0.0 <= mask_dropout < 1.0:
            raise RlxError(f"algo.mask_dropout={mask_dropout} must be in [0, 1)")
        self.beta, self.mask, self.independent = beta, mask, independent
        self.mask_on_reward, self.mask_on_kl, self.kl_without_mask = mask_on_reward, mask_on_kl, kl_without_mask
        self.mask_weight_decay, self.mask_lr = mask_weight_decay, mask_lr
        self.pairs = PairBatcher(reference, max_length)
        self.reference = self.pairs.reference
        if mask == "activation":
            decoder_layers(self.reference)  # a clear error now, not at the first step
        # the official code halves both coefficients for a common mask, which both terms would count
        common_both = mask_on_reward and mask_on_kl and not independent
        self.l1_reward = l1_reward / 2 if common_both else l1_reward
        self.l1_kl = l1_kl / 2 if common_both else l1_kl
        self.heads = nn.ModuleDict()
        if mask == "learned":
            config, ref = self.reference.config, next(self.reference.parameters())
            names = ([n for n, on in (("reward", mask_on_reward), ("kl", mask_on_kl)) if on] if independent
                     else ["common"])
            with torch.random.fork_rng(devices=[]):  # the heads' init depends on mask_seed only
                torch.manual_seed(mask_seed)
                for name in names:
                    self.heads[name] = MaskHead(config.hidden_size, config.num_hidden_layers, mask_dropout)
            self.heads.to(ref.device).train()

    # ------------------------------------------------------------------ contract

    def param_groups(self) -> list[dict]:
        if not len(self.heads):
            return []
        group = {"params": [(f"sparsepo_mask.{n}", p) for n, p in self.heads.named_parameters()],
                 "weight_decay": self.mask_weight_decay}
        return [group if self.mask_lr is None else {**group, "lr": self.mask_lr}]

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict()} if len(self.heads) else {}

    def load_state_dict(self, state: dict) -> None:
        if len(self.heads) and "heads" in state:
            self.heads.load_state_dict(state["heads"])

    def make_batch(self, examples: list[dict], state) -> dict:
        # no cached summed log-probs: the reference's per-token distributions are needed at loss time
        batch = self.pairs.tokenize(examples, state.tokenizer, state.model.device)
        batch["num_targets"] = len(examples)  # the loss is a mean over pairs
        batch["num_tokens"] = int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch

    # ------------------------------------------------------------------ pieces

    @torch.no_grad()
    def reference_forward(self, batch: dict) -> tuple[Tensor, list[Tensor], dict[str, list[Tensor]]]:
        """The reference's logits [N, T, V], hidden states after each layer, and (activation mask)
        the MLP and attention outputs of each layer, all aligned to predict labels[:, 1:]."""
        hooked: dict[str, list[Tensor]] = {"mlp": [], "attention": []}
        handles = []
        if self.mask == "activation":
            def keep(kind):
                return lambda module, args, out: hooked[kind].append((out[0] if isinstance(out, tuple) else out)[:, :-1])
            for layer in decoder_layers(self.reference):
                handles += [layer.mlp.register_forward_hook(keep("mlp")),
                            layer.self_attn.register_forward_hook(keep("attention"))]
        try:
            out = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        hidden = [h[:, :-1] for h in out.hidden_states[1:]]  # embeddings excluded
        return out.logits[:, :-1], hidden, hooked

    def masks(self, hidden: list[Tensor], hooked: dict, logits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(m_u, m_d) [N, T], after mask_on_reward / mask_on_kl."""
        ones = torch.ones(valid.shape, dtype=torch.float32, device=valid.device)
        if self.mask == "ones":
            m_u = m_d = ones
        elif self.mask == "activation":
            m_u = m_d = activation_map({**hooked, "residual": hidden, "logits": [logits]}, valid)
        elif self.independent:
            m_u = self.heads["reward"](hidden) if self.mask_on_reward else ones
            m_d = self.heads["kl"](hidden) if self.mask_on_kl else ones
        else:
            m_u = m_d = self.heads["common"](hidden)
        if not self.mask_on_reward:
            m_u = ones
        if not self.mask_on_kl:
            m_d = ones if self.kl_without_mask == "full" else torch.zeros_like(ones)
        return m_u, m_d

    def loss(self, batch: dict, state):
        ref_logits, hidden, hooked = self.reference_forward(batch)
        logits = state.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE
        logps, ref_logps, kl = token_terms(logits, ref_logits, labels)
        m_u, m_d = self.masks(hidden, hooked, ref_logits, valid)
        u, s = masked_sums(logps, ref_logps, kl, m_u, m_d, valid)
        (u_w, u_l), (s_w, s_l) = u.chunk(2), s.chunk(2)
        losses = sparsepo_loss(u_w, u_l, s_w, s_l, self.beta)
        if self.l1_reward and self.mask_on_reward:
            losses = losses + self.l1_reward * sum(l1_norms(m_u, valid).chunk(2))
        if self.l1_kl and self.mask_on_kl:
            losses = losses + self.l1_kl * sum(l1_norms(m_d, valid).chunk(2))
        loss = losses.mean()
        seq_kl = (kl.detach() * valid).sum(-1).chunk(2)
        metrics = {"train/loss": loss.detach(), **reward_metrics("sparsepo", self.beta * u_w.detach(),
                                                                 self.beta * u_l.detach()),
                   "sparsepo/seq_kl_chosen": seq_kl[0].mean().item(),
                   "sparsepo/seq_kl_rejected": seq_kl[1].mean().item()}
        for name, m, on in (("reward", m_u, self.mask_on_reward), ("kl", m_d, self.mask_on_kl)):
            if on:
                for side, m_side, v_side in zip(("chosen", "rejected"), m.detach().chunk(2), valid.chunk(2)):
                    zeros = ((m_side == 0) & v_side).sum() / v_side.sum().clamp(min=1)
                    metrics[f"sparsepo/{name}_mask_sparsity_{side}"] = zeros.item()
        return loss, metrics
