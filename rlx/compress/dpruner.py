"""D-Pruner (Zhang et al., NAACL 2024 Findings): pruning that keeps both general and domain ability.

1. **General importance** on an open-domain calibration set (`calib.general`): the OBS error of
   removing each weight from its layer, ε_ij = ½ W_ij² / [H⁻¹]_jj with H = Σ x xᵀ of the layer's
   inputs (damped like GPTQ's). It is scaled per layer to a map G in [0, 1] (divided by its max).
2. **A refined domain loss**: L' = CE(domain) + λ Σ G_ij (W'_ij − W_ij)², an EWC-style penalty
   that makes moving a generally important weight expensive while the model fits the domain set.
3. **Dual importance**: the model is fine-tuned on the domain calibration set under L' (plain SGD,
   gradient norm clipped, as the authors' code does with LOMO), and at every step each weight's
   second-order Taylor estimate of the change in L' when it is zeroed is added up:
       S_ij += | g'W' − ½ (g'W')² | + λ G W'²,   g' = ∂L'/∂W'
   The first part is the data term's estimate, its curvature from the empirical Fisher (g'²,
   one minibatch per step); g' includes the penalty's gradient, so g'W' also carries the
   penalty's first-order term. The second is the penalty's curvature term ½·2λG·W'², not its
   exact cost of zeroing the weight, which is λG(W² − (W' − W)²) (the penalty at W' = 0 minus
   its value at W'); the two agree only where W' = W, as at the first step. The two are added
   as magnitudes: inside one |·| a weight's first-order term can cancel its penalty, so the
   weights the penalty is meant to protect could score lowest of all.
4. The original (not fine-tuned) weights are pruned: the lowest S within each layer go.

With λ = 0 the score is the domain-only Taylor/Fisher score; with no domain gradient it is λ·G·W²,
the general importance weighted by W².
Only the prunable linear layers move during the scoring fine-tune (embeddings, norms and the
head stay frozen), and every weight is put back afterwards.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlx.errors import RlxError


def general_importance(w: Tensor, h: Tensor, damp: float = 0.01) -> Tensor:
    """ε_ij = ½ W_ij² / [H⁻¹]_jj: the rise in ½‖(W − W')X‖² when W_ij is zeroed and the rest of
    row i is re-fit (Optimal Brain Surgeon), with H damped by `damp` × its mean diagonal.

    The damping comes before the dead-input check, so an input never seen (H_jj = 0) has
    H_jj = δ = damp × mean diagonal by then, the check never fires, and its weights score
    ½ W_ij² δ: small, but never zero (with damp = 0 the check sets H_jj = 1: ½ W_ij²)."""
    h = h.double() + damp * torch.diag(h).mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=torch.float64)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # reached only with damp = 0 (damping fills dead inputs); then ε = ½ W², not 0
    h_inv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(h)))
    return (0.5 * w.double() ** 2 / h_inv_diag[None, :]).to(w.dtype)


def dual_score(grad: Tensor, w: Tensor, general: Tensor, lam: float) -> Tensor:
    """One step's score for zeroing each weight under L': |g'W' − ½ (g'W')²| + λ G W'² (the
    penalty's curvature term; its exact cost of zeroing is λ G (W² − (W' − W)²))."""
    gw = grad * w
    return (gw - 0.5 * gw**2).abs() + lam * general * w**2


class DPruner:
    """`rlx prune method=dpruner calib.general=shakespeare`: see the module docstring.

    lam: λ, the weight of the generality penalty; lr, epochs, clip_norm: the SGD fine-tune on
    the domain calibration set that the scores are accumulated over; damp: H's damping."""

    def __init__(self, lam: float = 1.0, lr: float = 0.03, epochs: int = 1, clip_norm: float = 1.0,
                 damp: float = 0.01):
        if lam < 0 or lr <= 0 or epochs < 1:
            raise RlxError(f"method=dpruner needs lam >= 0, lr > 0 and epochs >= 1 (got {lam}, {lr}, {epochs})")
        if lam * lr >= 1:  # SGD on λG(W'−W)² with G ≤ 1 oscillates unless lr·λ < 1
            raise RlxError(f"method=dpruner: lam × lr = {lam * lr:g} must stay below 1, or the penalty's SGD "
                           "steps overshoot and diverge")
        self.lam, self.lr, self.epochs, self.clip_norm, self.damp = lam, lr, epochs, clip_norm, damp

    def general_map(self, model: nn.Module, general: list[dict], progress: bool = True) -> dict[str, Tensor]:
        """G for every prunable layer from the open-domain batches, each scaled to max 1."""
        from rlx.compress.ptq import calibrated_layers

        maps = {}
        for name, layer, h in calibrated_layers(model, general, progress, "general importance"):
            eps = general_importance(layer.weight.data.float(), h, self.damp)
            maps[name] = eps / eps.max().clamp_min(1e-30)
        return maps

    def scores(self, model: nn.Module, general: list[dict], domain: list[dict],
               progress: bool = True) -> dict[str, Tensor]:
        """S for every prunable layer (by qualified name); `model` is left exactly as it came."""
        if general is None:
            raise RlxError("method=dpruner needs an open-domain calibration set besides the domain task: give "
                           "calib.general=shakespeare (any option of the data group)")
        from tqdm.auto import tqdm

        g_map = self.general_map(model, general, progress)
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight for name in g_map}
        anchors = {name: w.detach().clone() for name, w in weights.items()}
        frozen = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        score = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        optimizer = torch.optim.SGD(list(weights.values()), lr=self.lr)
        model.train()
        try:
            steps = [b for _ in range(self.epochs) for b in domain]
            for batch in tqdm(steps, desc="dual importance", disable=None if progress else True):
                loss = model(**batch).loss
                if self.lam:
                    loss = loss + self.lam * sum((g_map[n] * (w - anchors[n]) ** 2).sum() for n, w in weights.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not torch.isfinite(loss):
                    raise RlxError("method=dpruner: the domain loss became non-finite during the scoring fine-tune; "
                                   "lower method.lr")
                with torch.no_grad():
                    for n, w in weights.items():
                        score[n] += dual_score(w.grad.float(), w.float(), g_map[n], self.lam)
                if self.clip_norm:
                    torch.nn.utils.clip_grad_norm_(list(weights.values()), self.clip_norm)
                optimizer.step()
        finally:
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(anchors[n])
                    w.grad = None
            for p, flag in frozen.items():
                p.requires_grad_(flag)
            model.train(was_training)
        return score
