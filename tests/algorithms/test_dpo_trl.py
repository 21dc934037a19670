"""rlx's DPO / cDPO / IPO against TRL's own `DPOTrainer._compute_loss`, on identical inputs.

TRL has no pure DPO loss function: the loss lives inside `DPOTrainer._compute_loss`, which runs
the model and then the loss. So the tests build a bare trainer (`DPOTrainer.__new__`) with just
the attributes that method reads, and give it either a stub model that returns chosen per-token
log-probs (the pure-loss tests) or a real tiny Llama with TRL's fused log-prob head (the
end-to-end test). Per-pair values come from the trainer's `accelerator.gather` calls, which TRL
makes on exactly the tensors it logs.

Conventions checked here (TRL 1.16):
* sigmoid sums log-probs over the completion (+EOS); IPO divides the summed log-ratios by the
  completion length, which rlx's `DPO.loss` does before calling `dpo_loss`;
* TRL logs implicit rewards from the summed log-ratios for every loss type; rlx logs them from
  the log-probs the loss used, so for IPO rlx's rewards are TRL's divided by the length;
* TRL 1.16's "sigmoid" ignores `label_smoothing` (it only feeds "robust", "exo_pair" and the AOT
  losses). Its cDPO formula survives in "aot": for a single pair AOT's sort is the identity and
  the loss is exactly -(1-e) log s(b h) - e log s(-b h), so cDPO is compared one pair at a time.
"""
import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from rlx.algorithms._pairs import response_logps  # noqa: E402
from rlx.algorithms.dpo import DPO, dpo_loss  # noqa: E402
from rlx.data.collate import lm_batch, pair_rows  # noqa: E402
from rlx.data.preferences import ReasoningPairs  # noqa: E402
from rlx.models import tiny  # noqa: E402
from rlx.state import TrainState  # noqa: E402

ATOL = 1e-6
BETAS = (0.05, 0.1, 0.5, 2.0)
SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
# What `_compute_loss` passes to `accelerator.gather`, in order (asserted, so a TRL change shows up)
GATHERED = ("chosen_rewards", "rejected_rewards", "reward_accuracies", "margins", "chosen_logps", "rejected_logps")


class _Accelerator:
    """Single process: gathers are identities; `gather` calls are recorded to read per-pair values."""

    device = torch.device("cpu")

    def __init__(self):
        self.gathered = []

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        self.gathered.append(x.detach().clone())
        return x


def trl_trainer(beta: float, loss_type: str, label_smoothing: float = 0.0, model=None, ref_model=None,
                discopop_tau: float = 0.05) -> DPOTrainer:
    """A DPOTrainer with only the state `_compute_loss` reads; no reference model means the inputs
    carry precomputed reference log-probs (TRL's `precompute_ref_log_probs`)."""
    trainer = DPOTrainer.__new__(DPOTrainer)  # skips __init__: no datasets, no accelerate setup
    attrs = dict(model=model, ref_model=ref_model, precompute_ref_logps=ref_model is None, beta=beta,
                 loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing, ld_alpha=None,
                 f_divergence_type="reverse_kl", use_weighting=False, aux_loss_enabled=False,
                 accelerator=_Accelerator(), args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=discopop_tau),
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    for name, value in attrs.items():
        setattr(trainer, name, value)
    return trainer


def run_trl(trainer: DPOTrainer, inputs: dict) -> dict:
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    assert len(trainer.accelerator.gathered) == len(GATHERED)
    return {"loss": loss, **dict(zip(GATHERED, trainer.accelerator.gathered))}


# ---------------------------------------------------------------------------- pure loss


class _LogpsModel(torch.nn.Module):
    """Stands in for a model patched with TRL's fused head: returns the given per-token log-probs."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids, labels, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def random_pairs(n: int = 8, seed: int = 0) -> dict:
    """Summed log-probs of policy and reference for n pairs, and each side's completion length."""
    g = torch.Generator().manual_seed(seed)
    logps = {k: -torch.empty(n, dtype=torch.float64).uniform_(2.0, 60.0, generator=g)
             for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    lengths = {k: torch.randint(3, 40, (n,), generator=g) for k in ("chosen", "rejected")}
    return {"logps": logps, "lengths": lengths}


def trl_inputs(pairs: dict, i: int, prompt_len: int = 5) -> tuple[dict, torch.Tensor]:
    """Pair i as TRL's collator lays it out (chosen row, rejected row), and per-token log-probs
    over the shifted completion positions that sum to the pair's log-probs."""
    n_c, n_r = (int(pairs["lengths"][k][i]) for k in ("chosen", "rejected"))
    width = prompt_len + max(n_c, n_r)
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    completion_mask[0, prompt_len:prompt_len + n_c] = 1
    completion_mask[1, prompt_len:prompt_len + n_r] = 1
    shifted = completion_mask[:, 1:].double()
    totals = torch.stack([pairs["logps"]["chosen"][i], pairs["logps"]["rejected"][i]])
    per_token = shifted * (totals / shifted.sum(1)).unsqueeze(1)
    inputs = {"input_ids": torch.zeros(2, width, dtype=torch.long), "attention_mask": torch.ones(2, width),
              "completion_mask": completion_mask,
              "ref_chosen_logps": pairs["logps"]["ref_chosen"][i:i + 1],
              "ref_rejected_logps": pairs["logps"]["ref_rejected"][i:i + 1]}
    return inputs, per_token


def trl_per_pair(pairs: dict, beta: float, loss_type: str, label_smoothing: float = 0.0, **kwargs) -> dict:
    """TRL's loss and rewards for each pair, one pair per call."""
    rows = []
    for i in range(len(pairs["lengths"]["chosen"])):
        inputs, per_token = trl_inputs(pairs, i)
        trainer = trl_trainer(beta, loss_type, label_smoothing, model=_LogpsModel(per_token), **kwargs)
        rows.append(run_trl(trainer, inputs))
    return {k: torch.stack([r[k].reshape(()) for r in rows]) for k in ("loss", "chosen_rewards", "rejected_rewards")}


def trl_whole_batch(pairs: dict, beta: float, loss_type: str, label_smoothing: float = 0.0) -> dict:
    """TRL's loss (the batch mean) and per-pair rewards with all pairs in one batch: TRL's collator
    layout, every chosen row then every rejected row, padded to the longest."""
    rows = [trl_inputs(pairs, i) for i in range(len(pairs["lengths"]["chosen"]))]
    width = max(inputs["input_ids"].shape[1] for inputs, _ in rows)
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))
    side = lambda k, j: torch.cat([pad(inputs[k][j:j + 1]) for inputs, _ in rows])
    per_token = torch.cat([torch.cat([pad(p[j:j + 1]) for _, p in rows]) for j in (0, 1)])
    inputs = {k: torch.cat([side(k, 0), side(k, 1)]) for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs.update(ref_chosen_logps=pairs["logps"]["ref_chosen"], ref_rejected_logps=pairs["logps"]["ref_rejected"])
    return run_trl(trl_trainer(beta, loss_type, label_smoothing, model=_LogpsModel(per_token)), inputs)


def rlx_losses(pairs: dict, beta: float, loss_type: str, label_smoothing: float = 0.0, per_token: bool = False,
               **kwargs):
    logps = pairs["logps"]
    n = {"chosen": 1, "rejected": 1}
    if per_token:  # what rlx's DPO.loss hands dpo_loss for IPO: per-token averages
        n = {k: pairs["lengths"][k].double() for k in n}
    return dpo_loss(logps["chosen"] / n["chosen"], logps["rejected"] / n["rejected"],
                    logps["ref_chosen"] / n["chosen"], logps["ref_rejected"] / n["rejected"],
                    beta, loss_type, label_smoothing, **kwargs)


@pytest.mark.parametrize("beta", BETAS)
def test_sigmoid_matches_trl(beta):
    pairs = random_pairs()
    losses, chosen, rejected = rlx_losses(pairs, beta, "sigmoid")
    trl = trl_per_pair(pairs, beta, "sigmoid")
    torch.testing.assert_close(losses, trl["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen, trl["chosen_rewards"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected, trl["rejected_rewards"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_label_smoothing_matches_trl_cdpo(beta):
    pairs = random_pairs(seed=1)
    losses, chosen, rejected = rlx_losses(pairs, beta, "sigmoid", label_smoothing=0.1)
    trl = trl_per_pair(pairs, beta, "aot", label_smoothing=0.1)  # cDPO for one pair, see the module docstring
    torch.testing.assert_close(losses, trl["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen, trl["chosen_rewards"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected, trl["rejected_rewards"], atol=ATOL, rtol=0)
    # and at e = 0 the same TRL code path is plain DPO, as rlx's sigmoid is
    torch.testing.assert_close(rlx_losses(pairs, beta, "sigmoid")[0], trl_per_pair(pairs, beta, "aot")["loss"],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_ipo_matches_trl(beta):
    pairs = random_pairs(seed=2)
    losses, chosen, rejected = rlx_losses(pairs, beta, "ipo", per_token=True)
    trl = trl_per_pair(pairs, beta, "ipo")
    torch.testing.assert_close(losses, trl["loss"], atol=ATOL, rtol=0)
    # TRL logs IPO's rewards from summed log-ratios; rlx from the per-token averages the loss used
    torch.testing.assert_close(chosen * pairs["lengths"]["chosen"], trl["chosen_rewards"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected * pairs["lengths"]["rejected"], trl["rejected_rewards"], atol=ATOL, rtol=0)


# Each remaining pairwise loss, with the settings it reads: (loss_type, label_smoothing, extra settings)
PAIRWISE = [("hinge", 0.0, {}), ("nca_pair", 0.0, {}), ("bco_pair", 0.0, {}), ("sppo_hard", 0.0, {}),
            ("apo_zero", 0.0, {}), ("apo_down", 0.0, {}), ("discopop", 0.0, {}),
            ("discopop", 0.0, {"discopop_tau": 1.0}), ("robust", 0.0, {}), ("robust", 0.1, {}),
            ("robust", 0.3, {}), ("exo_pair", 1e-3, {}), ("exo_pair", 0.1, {})]


@pytest.mark.parametrize("loss_type,label_smoothing,extra", PAIRWISE,
                         ids=[f"{t}-{e}-{'-'.join(map(str, x.values()))}" for t, e, x in PAIRWISE])
@pytest.mark.parametrize("beta", BETAS)
def test_pairwise_losses_match_trl(beta, loss_type, label_smoothing, extra):
    pairs = random_pairs(seed=3)
    losses, chosen, rejected = rlx_losses(pairs, beta, loss_type, label_smoothing, **extra)
    trl = trl_per_pair(pairs, beta, loss_type, label_smoothing, **extra)
    torch.testing.assert_close(losses, trl["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen, trl["chosen_rewards"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected, trl["rejected_rewards"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_sigmoid_norm_matches_trl(beta):
    pairs = random_pairs(seed=4)
    losses, chosen, rejected = rlx_losses(pairs, beta, "sigmoid_norm", per_token=True)
    trl = trl_per_pair(pairs, beta, "sigmoid_norm")
    torch.testing.assert_close(losses, trl["loss"], atol=ATOL, rtol=0)
    # as for IPO, TRL's logged rewards are the summed ones
    torch.testing.assert_close(chosen * pairs["lengths"]["chosen"], trl["chosen_rewards"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("beta", BETAS)
def test_aot_matches_trl_on_a_batch(beta, loss_type, label_smoothing):
    """AOT sorts across the batch, so it is compared with all 8 pairs in one TRL batch."""
    pairs = random_pairs(seed=5)
    losses, chosen, rejected = rlx_losses(pairs, beta, loss_type, label_smoothing)
    trl = trl_whole_batch(pairs, beta, loss_type, label_smoothing)
    torch.testing.assert_close(losses.mean(), trl["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen, trl["chosen_rewards"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected, trl["rejected_rewards"], atol=ATOL, rtol=0)
    # the sort matters on this batch: pair by pair (no sort) the loss is another number
    unsorted = rlx_losses(pairs, beta, "sigmoid", label_smoothing)[0].mean()
    assert abs(unsorted.item() - trl["loss"].item()) > 1e-3


def test_whole_batch_layout_matches_one_pair_at_a_time():
    """The batched TRL inputs are right: on a per-pair loss they give the mean of the one-pair calls."""
    pairs = random_pairs(seed=6)
    torch.testing.assert_close(trl_whole_batch(pairs, 0.1, "ipo")["loss"], trl_per_pair(pairs, 0.1, "ipo")["loss"].mean(),
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- a real model


def trl_batch(examples: list[dict], tokenizer) -> dict:
    """TRL's tokenized rows (completion + EOS) through TRL's own collator."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    rows = [{"prompt_ids": ids(ex["prompt"]), "chosen_ids": ids(ex["chosen"]) + eos,
             "rejected_ids": ids(ex["rejected"]) + eos} for ex in examples]
    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)


def fused(model):
    """A copy with TRL's fused log-prob head (what DPOTrainer patches onto its models)."""
    model = copy.deepcopy(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot"])
def test_tiny_model_end_to_end_matches_trl(loss_type):
    """rlx's tokenisation, log-prob gathering and loss against TRL's collator, fused head and loss,
    on a random tiny Llama in float32 (rlx's `response_logps` takes the log-softmax in float32
    whatever the model's dtype, so float64 would not make the comparison tighter)."""
    policy = tiny(**SMALL, device="cpu")
    reference = tiny(**SMALL, seed=1, device="cpu")  # other weights: nonzero log-ratios
    examples = ReasoningPairs(num_train=6, num_validation=2, num_test=2).split("train")[:6]

    algo = DPO(reference, beta=0.1, loss_type=loss_type)
    state = TrainState(policy.model, policy.tokenizer, None, None, None)
    batch = algo.make_batch(examples, state)
    loss, metrics = algo.loss(batch, state)
    logps = response_logps(policy.model, lm_batch(pair_rows(examples), policy.tokenizer, algo.max_length))[0]

    trainer = trl_trainer(0.1, loss_type, model=fused(policy.model), ref_model=fused(reference.model))
    trl = run_trl(trainer, trl_batch(examples, policy.tokenizer))
    # float32 sums over a few hundred tokens: equal up to the last bit or so, hence relative
    torch.testing.assert_close(logps, torch.cat([trl["chosen_logps"], trl["rejected_logps"]]), atol=0, rtol=1e-6)
    torch.testing.assert_close(loss, trl["loss"], atol=ATOL, rtol=0)
    if loss_type not in ("ipo", "sigmoid_norm"):  # their logged rewards differ by design (see test_ipo_matches_trl)
        # beta * (logp - ref logp) inherits the float32 rounding of log-probs near -500 (a few 1e-5)
        assert metrics["dpo/chosen_reward"] == pytest.approx(trl["chosen_rewards"].mean().item(), abs=10 * ATOL)
        assert metrics["dpo/reward_margin"] == pytest.approx(trl["margins"].mean().item(), abs=10 * ATOL)
