"""Every optimizer runs inside the one loop with SFT, DPO and GRPO, reports its memory, and resumes exactly."""
import pytest
import torch

from rlx.errors import RlxError
from rlx.tasks import run_training
from tests.support import small_config, straight_and_resumed

OPTIMIZERS = {
    "adamw": [], "sgd": [], "adamw8bit": [], "lion": [], "lion8bit": [], "lion_k-nuclear": ["optimizer.kernel=nuclear"],
    "classp": [], "frugal": [], "frugal-svd": ["optimizer.projector=svd"], "frugal-0": ["optimizer.density=0"],
    "galore": [], "fira": [],
}  # torchao's low-bit AdamW runs in the loop in test_eight_bit.py (it compiles its step: seconds per shape)
ALGOS = {"sft": ["algo=sft"], "dpo": ["algo=dpo", "data=reasoning_pairs", "data.num_train=32"], "grpo": ["algo=grpo"]}


# the fast suite trains each optimizer once, cycling through the algorithms (each runs with four of them);
# the rest of the cross product is slow (`make test-slow`)
COVERING = {(name, list(ALGOS)[i % len(ALGOS)]) for i, name in enumerate(OPTIMIZERS)}


def options(name: str) -> list[str]:
    return [f"optimizer={name.split('-')[0]}", *OPTIMIZERS[name]]


@pytest.mark.parametrize("algo, optimizer", [
    pytest.param(algo, optimizer, id=f"{algo}-{optimizer}",
                 marks=() if (optimizer, algo) in COVERING else pytest.mark.slow)
    for algo in ALGOS for optimizer in OPTIMIZERS])
def test_optimizer_composes(optimizer, algo, tmp_path):
    summary = run_training(small_config(*options(optimizer), *ALGOS[algo]), tmp_path)
    assert summary["steps"] == 2
    assert summary["memory/step_peak_MB"] >= summary["memory/held_MB"] > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw8bit", "lion", "lion8bit", "frugal", "frugal-svd", "galore", "fira"])
def test_optimizers_resume_exactly(optimizer, tmp_path):
    # update_gap 3: the resumed half crosses a refresh, and the cut falls inside a period
    gap = ["optimizer.update_gap=3"] if optimizer.split("-")[0] in ("frugal", "galore", "fira") else []
    full, resumed, w_full, w_cut = straight_and_resumed(tmp_path, [*options(optimizer), *gap,
                                                                    "trainer.lr_scheduler=constant"], steps=5, cut=2)
    assert full["train/loss"] == resumed["train/loss"]
    for k in w_full:
        torch.testing.assert_close(w_full[k], w_cut[k], rtol=0, atol=0)


def test_splitting_keeps_less_state_than_adamw(tmp_path):
    held = {name: run_training(small_config(*options(name), "model.hidden_size=64", "model.intermediate_size=128"),
                               tmp_path / name)["memory/optimizer_MB"]
            for name in ("adamw", "frugal", "frugal-0", "galore")}
    assert held["frugal-0"] < held["frugal"] < held["adamw"] and held["galore"] < held["adamw"]


@pytest.mark.parametrize("optimizer", ["galore", "frugal", "lion", "lion_k", "adamw8bit", "adamw8bit_ao", "classp"])
def test_eco_refuses_optimizers_without_adam_or_sgd_momentum_in_the_weights_shape(optimizer, tmp_path):
    """ECO folds the residual into SGD's or Adam's first moment with their own algebra: subspace state
    (FRUGAL, GaLore, Fira), sign-momentum (Lion), quantized state and no momentum (CLASSP) are refused."""
    with pytest.raises(RlxError, match="momentum"):
        # intermediate 128: the 32x128 MLP matrices reach the size torchao quantizes the state of (4,096)
        run_training(small_config(f"optimizer={optimizer}", "quantizer=eco", "model.intermediate_size=128"), tmp_path)


@pytest.mark.parametrize("optimizer", ["frugal", "galore", "fira"])
def test_splitting_configs_ship_the_papers_betas(optimizer):
    """FRUGAL (LLaMA-130M on C4), GaLore and Fira all train with Adam's betas (0.9, 0.999)."""
    from rlx.config import compose_config

    assert list(compose_config("train", [f"optimizer={optimizer}"]).optimizer.betas) == [0.9, 0.999]
