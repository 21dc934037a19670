"""LoRA RL: `algo.reference=adapters` takes the reference from the policy's own base with its
adapters off (no second copy), rlx's sampler runs the PEFT forward as it is, and GRPO, PPO and DPO
train only the adapters."""
import json

import pytest
import torch

from rlx.algorithms.grpo import GRPO
from rlx.data.collate import prompt_batch
from rlx.errors import RlxError
from rlx.models import reference_model, tiny
from rlx.rewards import WeightedSum
from rlx.rollout import sample, sequence_logprobs
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import TASK, TINY, Alternating, small_config

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
LORA_CLI = "model.lora={r:4,lora_alpha:8,target_modules:[q_proj,v_proj,up_proj,down_proj]}"


def _kick(model, scale=0.5):
    """Give the adapters a non-zero B (peft starts them at zero, where they change nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _logprobs(model):
    tok = tiny(**TINY, device="cpu").tokenizer
    b = prompt_batch([ex["prompt"] for ex in TASK.split("train")[:3]], tok, "cpu")
    torch.manual_seed(0)
    r = sample(model, b["input_ids"], b["attention_mask"], max_new_tokens=10, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    ids, mask = r.sequences()
    return r, ids, mask


def test_the_adapters_off_reference_is_the_base_model_and_the_sampler_runs_the_adapted_one():
    base = tiny(**TINY, device="cpu").model.eval()
    policy = tiny(**TINY, device="cpu", lora=LORA).model
    _kick(policy)
    r, ids, mask = _logprobs(policy)
    R = r.response_ids.shape[1]
    with torch.no_grad():
        adapted = sequence_logprobs(policy.eval(), ids, mask, R)
        with reference_model("adapters", policy) as ref:
            off = sequence_logprobs(ref, ids, mask, R)
        plain = sequence_logprobs(base, ids, mask, R)
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)  # adapters off: the base, bit for bit near enough
    torch.testing.assert_close(r.logprobs, adapted, atol=1e-5, rtol=0)  # the sampler used the adapted model
    assert (adapted - plain).abs().max() > 1e-2  # and the adapters matter
    with reference_model("adapters", policy) as ref:
        pass
    assert all(m.active_adapters for m in [policy.base_model])  # switched back on after the block


def test_adapters_reference_without_lora_is_one_clear_line():
    with pytest.raises(RlxError, match="needs a LoRA policy"):
        with reference_model("adapters", tiny(**TINY, device="cpu").model):
            pass


def test_grpo_with_lora_trains_only_the_adapters_against_the_frozen_base():
    policy = tiny(**TINY, device="cpu", lora=LORA)
    model = policy.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = TrainState(model, policy.tokenizer, torch.optim.SGD(trainable, lr=0.5), None, TASK)
    algo = GRPO(WeightedSum({"r": Alternating()}, {"r": 1.0}), group_size=4, max_new_tokens=8, kl_coef=0.1,
                reference="adapters")
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    metrics = []
    for _ in range(3):
        torch.manual_seed(0)
        batch = algo.make_batch(TASK.split("train")[:2], state)
        loss, m = algo.loss(batch, state)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        metrics.append(m)
    assert metrics[0]["rl/kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start: policy = reference
    assert metrics[-1]["rl/kl"] > 1e-6  # the adapters moved away from the base
    assert all(torch.equal(frozen_before[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert algo.reference == "adapters"  # no second model held


@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo"])
def test_lora_rl_runs_in_the_loop_with_the_adapters_reference(tmp_path, algo):
    extra = {"grpo": ["algo.group_size=2", "algo.max_new_tokens=8", "algo.kl_coef=0.05"],
             "ppo": ["algo.max_new_tokens=8", "algo.kl_coef=0.05"],
             "dpo": []}[algo]
    cfg = small_config(f"algo={algo}", LORA_CLI, "algo.reference=adapters", "trainer.micro_batch_size=2",
                       "trainer.max_steps=2", *extra)
    summary = run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    full = sum(p.numel() for p in tiny(**TINY, device="cpu").model.parameters()) / 1e6 * (2 if algo == "ppo" else 1)
    assert summary["params_M"] < 0.2 * full  # only the adapters train (PPO's critic is a LoRA copy too)
