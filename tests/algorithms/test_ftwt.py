"""algo=ftwt: which parameters each mode trains, the loss it reports, loop runs, exact resume of the
heads, and the gated model rebuilt from a checkpoint."""
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlx.algorithms.ftwt import FTWT
from rlx.compress.ftwt import load_gated, saved_gate
from rlx.data.reasoning import ReasoningTask
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.tasks import run_training
from tests.support import TINY, small_config, straight_and_resumed

TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


def one_loss(mode):
    policy = tiny(**TINY, device="cpu")
    algo = FTWT(32, 64, 1, mode=mode, rank=8)
    state = SimpleNamespace(model=policy.model, tokenizer=policy.tokenizer)
    batch = algo.make_batch(TASK.split("train")[:4], state)
    loss, metrics = algo.loss(batch, state)
    loss.backward()
    return policy.model, algo, loss, metrics


def test_decoupled_trains_the_heads_only_on_the_bce():
    model, algo, loss, metrics = one_loss("decoupled")
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.gate.parameters())
    assert loss.item() == pytest.approx(float(metrics["ftwt/bce"]))
    assert 0 < float(metrics["ftwt/target_share"]) < 1


def test_joint_adds_the_task_ce_and_trains_the_backbone():
    model, algo, loss, metrics = one_loss("joint")
    assert loss.item() == pytest.approx(float(metrics["train/ce"]) + float(metrics["ftwt/bce"]), rel=1e-6)
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # the BCE and CE reach below the blocks


def test_bad_mode_is_one_line_error():
    with pytest.raises(RlxError, match="algo.mode"):
        FTWT(32, 64, 1, mode="both")


def test_loop_run_keeps_the_backbone_and_saves_gated_heads(tmp_path):
    summary = run_training(small_config("algo=ftwt", "algo.rank=8", "trainer.max_steps=3"), tmp_path)
    assert 0 <= summary["ftwt/mask_acc"] <= 1 and summary["ftwt/mlp_flops_skipped"] < 1
    weights = load_file(tmp_path / "checkpoints/last/model.safetensors")
    fresh = tiny(**TINY, device="cpu").model.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in weights.items())  # decoupled: the backbone untouched
    gate = saved_gate(tmp_path)
    assert gate.settings() == {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "tau": 0.95, "rank": 8,
                               "rule": "reach"}
    fresh_heads = FTWT(32, 64, 1, rank=8).gate.state_dict()
    assert any(not torch.equal(v, fresh_heads[k]) for k, v in gate.state_dict().items())  # the heads trained
    policy, loaded = load_gated(tmp_path)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        gated = policy.model(input_ids=ids).logits
        loaded.detach_from_model()
        dense = policy.model(input_ids=ids).logits
    assert torch.equal(dense, tiny(**TINY, device="cpu").model(input_ids=ids).logits.detach())
    assert loaded.flops()["ftwt/kept_share"] < 1 and not torch.equal(gated, dense)


def test_joint_loop_run_moves_the_backbone(tmp_path):
    run_training(small_config("algo=ftwt", "algo.rank=8", "algo.mode=joint", "optimizer.lr=1e-3"), tmp_path)
    weights = load_file(tmp_path / "checkpoints/last/model.safetensors")
    fresh = tiny(**TINY, device="cpu").model.state_dict()
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], fresh["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow  # three loop runs: ~30 s on 2 busy cores
def test_resume_is_exact(tmp_path):
    over = ["algo=ftwt", "algo.rank=8", "trainer.lr_scheduler=constant"]
    full, resumed, _, _ = straight_and_resumed(tmp_path, over)
    assert resumed["train/loss"] == full["train/loss"]
    a, b = saved_gate(tmp_path / "full"), saved_gate(tmp_path / "cut")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
