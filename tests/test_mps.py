"""Apple silicon (MPS): training and greedy decoding agree with the CPU. Runs only where MPS exists."""

import copy

import pytest
import torch

from tinygpt import config
from tinygpt.config import SampleConfig
from tinygpt.device import mps_available
from tinygpt.infer.generate import generate_ids
from tinygpt.model import GPT
from tinygpt.train.optim import make_optimizer
from tinygpt.train.step import train_step

pytestmark = pytest.mark.skipif(not mps_available(), reason="no Apple MPS device here (it needs Apple "
                                                                 "silicon and a PyTorch built with MPS)")


def model_and_config():
    cfg = config.resolve(flags={"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
                                "model.block_size": 32, "model.vocab_size": 64, "train.optimizer": "adamw"})
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


def test_a_few_steps_on_mps_give_the_cpus_losses():
    model, cfg = model_and_config()
    batches = [torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(10)]
    losses = {}
    for name in ("cpu", "mps"):
        device = torch.device(name)
        m = copy.deepcopy(model).to(device)
        opt = make_optimizer(m, cfg.train, device)
        losses[name] = [train_step(m, m, opt, [(x.to(device), x.to(device), None)], 1.0, None).loss.item()
                        for x in batches]
    assert losses["mps"] == pytest.approx(losses["cpu"], abs=2e-3), losses


def test_greedy_decoding_on_mps_gives_the_cpus_tokens():
    model, _ = model_and_config()
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    greedy = SampleConfig(max_new_tokens=24, temperature=0.0, top_k=None)
    want = generate_ids(model.eval(), prompt, greedy)
    got = generate_ids(copy.deepcopy(model).to("mps").eval(), prompt.to("mps"), greedy)
    assert torch.equal(got.cpu(), want)
