import pytest
import torch

from conftest import greedy_without_cache
from tinygpt.config import ModelConfig, SampleConfig
from tinygpt.infer.generate import generate_ids, stream_tokens
from tinygpt.init_from import gpt2_state_from_hf
from tinygpt.model import GPT, adaptive_cutoffs


def greedy(n: int) -> SampleConfig:
    return SampleConfig(max_new_tokens=n, temperature=0)


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
    return ModelConfig(**{**base, **kw})


def perturbed(model: GPT, scale: float = 0.05) -> GPT:
    """Add noise to every parameter, so zero-initialised and unit-initialised pieces matter too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_matches_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=48, vocab_size=101,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT(ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=48, vocab_size=101)).eval()
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict()))
    idx = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("variant", [{}, {"pos": "rope"}, {"qk_norm": True},
                                     {"pos": "rope", "qk_norm": True}])
def test_einsum_attention_equals_sdpa(variant):
    torch.manual_seed(0)
    sdpa = perturbed(GPT(tiny(**variant))).eval()
    einsum = GPT(tiny(attn="einsum", **variant)).eval()
    einsum.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        assert torch.allclose(sdpa(idx)[0], einsum(idx)[0], atol=1e-5)
    prompt = idx[:, :4]
    assert torch.equal(generate_ids(sdpa, prompt, greedy(20)), generate_ids(einsum, prompt, greedy(20)))
    uncached = [list(stream_tokens(m, prompt, greedy(20), use_cache=False)) for m in (sdpa, einsum)]
    assert all(torch.equal(a, b) for a, b in zip(*uncached))


def test_attention_weights_are_causal_distributions():
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(attn="einsum", pos="rope"))).eval()
    weights = model.attention_weights(torch.randint(0, 50, (2, 10)))
    assert len(weights) == 2
    for w in weights:
        assert w.shape == (2, 4, 10, 10)
        assert torch.equal(w.triu(diagonal=1), torch.zeros_like(w))
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    with pytest.raises(ValueError, match="einsum"):
        GPT(tiny()).attention_weights(torch.zeros(1, 3, dtype=torch.long))


def test_qk_norm_and_zero_init_proj():
    names = set(dict(GPT(tiny(qk_norm=True)).named_parameters()))
    assert {"transformer.h.1.attn.q_norm.weight", "transformer.h.1.attn.k_norm.weight"} <= names
    assert "transformer.h.1.attn.q_norm.bias" not in names
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True))
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(not p.any() for p in projections)
    x, pos = torch.randn(2, 7, 32), torch.arange(7)
    for block in model.transformer.h:  # each pre-norm block starts as the identity
        assert torch.equal(block(x, pos, None, None, None), x)


def test_adaptive_cutoffs():
    assert adaptive_cutoffs(tiny(head="adaptive")) == [3, 12]
    assert adaptive_cutoffs(tiny(head="adaptive", vocab_size=8)) == [2]
    assert adaptive_cutoffs(tiny(head="adaptive", n_embd=64, adaptive_cutoffs="10,20,40")) == [10, 20, 40]
    for bad in ["20,10", "0,10", "10,50", "10,10"]:
        with pytest.raises(ValueError, match="increasing"):
            adaptive_cutoffs(tiny(adaptive_cutoffs=bad))
    with pytest.raises(ValueError, match="head=linear"):
        GPT(tiny(head="adaptive", vocab_size=3))
    with pytest.raises(ValueError, match="n_embd"):
        GPT(tiny(head="adaptive", n_embd=8, n_head=2))


def test_adaptive_head_gives_log_probs_and_matching_loss():
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(head="adaptive")))  # tie_weights=True is ignored: nothing to tie
    names = set(dict(model.named_parameters()))
    assert "lm_head.weight" not in names and any(n.startswith("adaptive_head.") for n in names)
    idx = torch.randint(0, 50, (2, 10))
    logprobs, _ = model(idx)
    assert logprobs.shape == (2, 10, 50)
    assert torch.allclose(logprobs.logsumexp(-1), torch.zeros(2, 10), atol=1e-5)
    assert torch.allclose(model.next_logits(idx), logprobs[:, -1], atol=1e-6)
    targets = torch.randint(0, 50, (2, 10))
    targets[0, 3:] = -1
    targets[1, :2] = -1
    logits, loss = model(idx, targets)
    keep = targets >= 0
    assert logits is None
    assert torch.allclose(loss, -logprobs[keep].gather(-1, targets[keep][:, None]).mean(), atol=1e-5)
    assert model(idx, torch.full_like(targets, -1))[1].item() == 0.0


def test_adaptive_head_trains():
    torch.manual_seed(0)
    model = GPT(tiny(head="adaptive"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(10):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("variant", [{}, {"head": "adaptive"}, {"qk_norm": True, "mlp": "relu2",
                                                                "pos": "rope"},
                                     {"attn": "einsum", "zero_init_proj": True, "tie_weights": False}])
def test_num_params(variant):
    model = GPT(tiny(**variant))
    unique = sum(p.numel() for p in model.parameters())
    wpe = 32 * 32 if model.config.pos == "learned" else 0
    assert model.num_params(non_embedding=False) == unique and model.num_params() == unique - wpe


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_gradients(dropout):
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(dropout=dropout, pos="rope", qk_norm=True)))
    idx = torch.randint(0, 50, (2, 16))
    grads = []
    for flag in (False, True):
        model.activation_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(1)
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


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
    assert logits is None  # the fused loss (tinygpt.loss) never builds them
    expected = torch.nn.functional.cross_entropy(model(idx)[0][0, :5], idx[0, :5])
    assert torch.allclose(part, expected) and not torch.allclose(part, full)


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=1000))
    idx, targets = torch.randint(0, 1000, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.2


@pytest.mark.parametrize("variant", [{}, {"pos": "rope"}, {"pos": "sinusoidal", "attn": "einsum"}])
def test_packed_segments_are_processed_as_if_alone(variant):
    """Two sequences packed in one row with segment ids give the same logits as each run on its own."""
    torch.manual_seed(0)
    model = GPT(tiny(**variant)).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 9))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        logits, _ = model(packed, segments=segments)
        alone = torch.cat([model(a)[0], model(b)[0]], dim=1)
    assert torch.allclose(logits, alone, atol=1e-5)


def test_one_token_steps_through_onednn_give_the_same_greedy_tokens(monkeypatch):
    from tinygpt.infer import kernels
    from tinygpt.infer.kernels import OneDNNLinears
    if not kernels.passes(kernels.onednn_agrees):
        pytest.skip("this PyTorch build has no oneDNN linear op")
    monkeypatch.setattr(kernels, "onednn_wins", lambda: False)  # where the timing finds it slower: unused
    assert not OneDNNLinears(GPT(tiny(n_layer=1, n_head=4, n_embd=256, vocab_size=1024))).forwards
    monkeypatch.setattr(kernels, "onednn_wins", lambda: True)  # forced, whatever this machine's timing says
    torch.manual_seed(0)
    # 256 x 1024 weights (c_fc, c_proj, the head) are exactly the size the decode loop hands to oneDNN
    model = perturbed(GPT(tiny(n_layer=1, n_head=4, n_embd=256, vocab_size=1024)))
    routed = {name for name, m in model.named_modules() if m in OneDNNLinears(model).forwards}
    assert routed == {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"}
    prompt = torch.randint(0, 1024, (1, 4))
    assert torch.equal(generate_ids(model, prompt, greedy(24)), greedy_without_cache(model, prompt, 24))
    assert "forward" not in vars(model.lm_head)  # the model is left as it was


# Defect: under bf16 autocast (what train.dtype auto picks on CPUs with native bf16) every QK-norm call warned
# "Mismatch dtype between input and weight" from torch's rms_norm.
def test_bf16_autocast_training_prints_no_library_warnings(text_file, tmp_path, capsys):
    import warnings

    from conftest import tiny_flags
    from tinygpt.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["train", "--data", str(text_file), "--out", str(tmp_path / "run"), "--train.dtype",
                     "bfloat16",
                     *tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 1})])
    assert code == 0, capsys.readouterr().err
    assert "bf16 autocast" in capsys.readouterr().err
    assert [str(w.message) for w in caught] == []


def test_rmsnorm_under_autocast_equals_torchs_own_fallback():
    import warnings

    from tinygpt.model import RMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(32), torch.nn.RMSNorm(32)
    theirs.weight.data = ours.weight.data = torch.randn(32)
    x = torch.randn(4, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own module warns here; ours must give the same values
        expected = theirs(x)
        got = ours(x)
    assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected)
    y = torch.randn(4, 32)
    assert torch.equal(ours(y), theirs(y))  # float32: the same op
