import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.generate import sample_token
from tinygpt.model import GPT, load_hf_gpt2_state_dict


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
    return ModelConfig(**{**base, **kw})


def test_matches_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=48, vocab_size=101,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT(ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=48, vocab_size=101)).eval()
    load_hf_gpt2_state_dict(ours, hf.state_dict())
    idx = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("variant", [
    {}, {"pos": "sinusoidal"}, {"pos": "rope"}, {"norm": "rmsnorm"}, {"norm_placement": "post"},
    {"mlp": "relu"}, {"mlp": "swiglu"}, {"tie_weights": False, "bias": False}, {"mlp_hidden": 48},
])
def test_kv_cache_greedy_equals_full_forward(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant))
    prompt = torch.randint(0, 50, (2, 5))
    cached = model.generate(prompt, 20, temperature=0)
    full = prompt
    for _ in range(20):  # the reference: a full forward pass for every new token, no cache
        logits, _ = model(full)
        full = torch.cat([full, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, full)


def test_generation_past_the_context_window_keeps_going():
    torch.manual_seed(0)
    model = GPT(tiny(block_size=8))
    out = model.generate(torch.zeros(1, 12, dtype=torch.long), 30, temperature=1.0, top_k=5)
    assert out.shape == (1, 42)


def test_variants_change_parameters_as_named():
    names = set(dict(GPT(tiny(pos="rope", norm="rmsnorm", bias=False, tie_weights=False)).named_parameters()))
    assert "transformer.wpe.weight" not in names
    assert not any(n.endswith(".bias") for n in names)
    assert "lm_head.weight" in names
    tied = GPT(tiny())
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_loss_ignores_minus_one_targets():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 50, (1, 10))
    targets = idx.clone()
    _, full = model(idx, targets)
    targets[0, 5:] = -1
    logits, part = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :5], idx[0, :5])
    assert torch.allclose(part, expected) and not torch.allclose(part, full)


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=1000))
    idx, targets = torch.randint(0, 1000, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.2


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    top2 = {int(sample_token(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert top2 == {0, 1}
    # probabilities ~[0.71, 0.26, ...]: top_p 0.5 keeps only the first token
    assert {int(sample_token(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} == {0}
    assert int(sample_token(logits, 0.0)) == 0
