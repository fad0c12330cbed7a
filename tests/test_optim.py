import pytest
import torch

from tinygpt import config
from tinygpt.model import GPT
from tinygpt.train.optim import Muon, Optimizers, make_optimizer, orthogonalize


def tiny_model():
    torch.manual_seed(0)
    return GPT(config.ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 1, shape[1]))  # column scales over 2 decades
    s = torch.linalg.svdvals(orthogonalize(g, torch.float32))
    assert s.min() > 0.5 and s.max() < 1.3
    assert orthogonalize(g, torch.float32).shape == g.shape


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = make_optimizer(model, config.TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, Optimizers) and isinstance(opt.optimizers["muon"], Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    adamw = {names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    assert len(opt.param_groups) == 3  # the loop's lr schedule reaches every group


def test_muon_training_lowers_the_loss_and_its_state_round_trips():
    model = tiny_model()
    opt = make_optimizer(model, config.TrainConfig(optimizer="muon", lr=1e-2), torch.device("cpu"))
    idx = torch.randint(0, 20, (4, 9))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    again = make_optimizer(model, config.TrainConfig(optimizer="muon", lr=1e-2), torch.device("cpu"))
    again.load_state_dict(opt.state_dict())
    p = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(again.optimizers["muon"].state[p]["momentum"],
                       opt.optimizers["muon"].state[p]["momentum"])
    with pytest.raises(ValueError, match="optimizer state"):  # an AdamW-only state does not fit a Muon run
        again.load_state_dict({"adamw": opt.optimizers["adamw"].state_dict()})
