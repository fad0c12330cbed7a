"""Every preset builds, trains a few steps on a scaled-down copy of its setup, checkpoints, reloads and
samples."""

import io
import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, train_run
from tinygpt import checkpoint, config
from tinygpt.cli import main
from tinygpt.config import SampleConfig
from tinygpt.data import prepare
from tinygpt.data.templates import TEMPLATES
from tinygpt.infer import quantize
from tinygpt.infer.chat import ChatSession
from tinygpt.infer.generate import generate_ids
from tinygpt.infer.kernels import KERNELS, Int8Linear, int8_kernel_works
from tinygpt.train.loop import train

SCALED_DOWN = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
               "model.mlp_hidden": "none", "data.vocab_size": 400, "train.epochs": "none",
               "train.max_iters": 4,
               "train.batch_size": 4, "train.eval_interval": 2, "train.eval_iters": 2,
               "train.checkpoint_interval": 2,
               "train.warmup_iters": 1}


def write_dialogs(p: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(12) for b in range(12)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


@pytest.fixture
def dialog_file(tmp_path):
    return write_dialogs(tmp_path / "chats.jsonl")


def use_gpt2_ranks(cfg: config.Config, mp: pytest.MonkeyPatch) -> None:
    """Offline GPT-2 BPE for a preset that uses it (skipped without the ranks file)."""
    if cfg.data.tokenizer == "gpt2":
        if not (SHARED_DATA / "gpt2.tiktoken").exists():
            pytest.skip("needs ../shared/data/gpt2.tiktoken for offline GPT-2 BPE")
        mp.setenv("TINYGPT_GPT2_RANKS", str(SHARED_DATA / "gpt2.tiktoken"))


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_preset_trains_reloads_and_samples(name, tmp_path, text_file, dialog_file, monkeypatch):
    cfg = config.resolve(name, flags=SCALED_DOWN)
    use_gpt2_ranks(cfg, monkeypatch)
    chat = cfg.data.chat_template != "default"  # the presets of chat systems get dialog data
    cfg.data.path = str(dialog_file if chat else text_file)
    ds = prepare.prepare(cfg, log=lambda m: None)
    cfg.model.vocab_size = ds.tokenizer.vocab_size
    run = tmp_path / "run"
    final = train(cfg, run, prepare.copy_to(ds, run / "data"), log=lambda m: None)
    assert final["step"] == 4 and final["val_loss"] < 20

    loaded = checkpoint.load(checkpoint.find(run, "last"))
    assert loaded.config == cfg
    torch.manual_seed(0)
    if chat:
        template = TEMPLATES[cfg.data.chat_template]
        assert set(template.specials) <= set(loaded.tokenizer.special_tokens)
        sampling = SampleConfig(max_new_tokens=5, temperature=1.0, top_k=None)
        reply = ChatSession(loaded.model, loaded.tokenizer, template, sampling).reply("hi")
        assert isinstance(reply, str)
    else:
        prompt = torch.tensor([loaded.tokenizer.encode("The ")])
        out = generate_ids(loaded.model, prompt, SampleConfig(max_new_tokens=5, temperature=1.0, top_k=10))
        assert out.shape == (1, len(loaded.tokenizer.encode("The ")) + 5)


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """A function giving each preset's scaled-down run on conversations, trained once for the module."""
    root = tmp_path_factory.mktemp("presets")
    dialogs, runs = write_dialogs(root / "chats.jsonl"), {}

    def run_of(name: str) -> Path:
        if name not in runs:
            with pytest.MonkeyPatch.context() as mp:
                use_gpt2_ranks(config.resolve(name), mp)
                flags = {**SCALED_DOWN, "train.max_iters": 2, "data.path": dialogs}
                args = [arg for k, v in flags.items() for arg in (f"--{k}", str(v))]
                runs[name] = train_run(tmp_path_factory, root / name, "--preset", name, *args)
        return runs[name]
    return run_of


# Defect: on a CPU where --dtype auto picked int8, a run of the tinygpt preset (adaptive softmax head) crashed
# in sample and chat. Each kernel is forced and auto is told int8 is faster: this CPU's probes hide nothing.
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", list(config.PRESETS))
def test_every_presets_run_samples_and_chats_in_int8_through_each_kernel(name, kernel, preset_run,
                                                                          monkeypatch, capsys):
    if not int8_kernel_works(kernel):
        pytest.skip(f"the {kernel} kernel does not run here")
    run = preset_run(name)
    use_gpt2_ranks(config.resolve(name), monkeypatch)
    monkeypatch.setattr(Int8Linear, "kernel", kernel)
    monkeypatch.setattr(quantize, "int8_speedup", lambda: 3.0)
    for dtype in ("auto", "int8"):
        flags = ["--run", str(run), "--dtype", dtype, "--max-new-tokens", "4", "--seed", "0"]
        assert main(["sample", *flags]) == 0
        monkeypatch.setattr("sys.stdin", io.StringIO("what is 2 plus 3?\nexit\n"))  # every vocabulary has it
        assert main(["chat", *flags]) == 0
        out, err = capsys.readouterr()
        assert not out.splitlines()[-1].startswith("(cannot reply"), out  # the reply was decoded
        checked = "dtype auto: int8" in err or "would move the val perplexity" in err  # auto tried int8
        assert checked == (dtype == "auto"), err


def test_presets_reproduce_their_documented_settings():
    m = config.resolve("micropgpt")
    assert (m.model.n_embd, m.model.n_head, m.model.n_layer, m.model.block_size) == (384, 4, 4, 128)
    assert (m.train.lr, m.train.min_lr, m.train.batch_size, m.train.max_iters) == (3e-4, 3e-4, 32, 3000)
    assert (m.data.tokenizer, m.data.val_fraction) == ("char", 0.2)
    t = config.resolve("tinygpt")
    assert (t.model.n_layer, t.model.n_head, t.model.n_embd, t.model.mlp_hidden,
            t.model.head) == (8, 6, 384, 1536, "adaptive")
    assert (t.data.tokenizer, t.data.chat_template, t.train.epochs, t.train.batch_size, t.model.dropout) == (
        "sentencepiece", "tinygpt", 10, 32, 0.05)
    g = config.resolve("gpt-lite")
    assert (g.model.pos, g.model.norm_placement, g.model.mlp,
            g.model.attn) == ("sinusoidal", "post", "relu", "einsum")
    lite = config.resolve("litegpt")
    assert (lite.data.tokenizer, lite.data.chat_template, lite.data.loss_on) == ("gpt2", "litegpt", "all")
    micro = config.resolve("microgpt")
    assert (micro.model.n_embd, micro.model.n_head, micro.model.block_size, micro.train.batch_size,
            micro.train.lr,
            micro.train.epochs, micro.data.tokenizer) == (512, 8, 512, 8, 3e-3, 1, "gpt2")
    modern = config.resolve()
    assert (modern.model.pos, modern.model.norm, modern.model.bias, modern.model.qk_norm,
            modern.model.tie_weights,
            modern.train.schedule) == ("rope", "rmsnorm", False, True, False, "wsd")
