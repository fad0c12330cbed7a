"""tinygpt export --format hf: transformers loads the folder with no custom code and computes the same logits,
greedy tokens and token ids as tinygpt (checked against transformers itself, not against our own reading)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA, tiny_flags
from tinygpt import run as tinygpt_run
from tinygpt.cli import main
from tinygpt.config import ModelConfig, SampleConfig
from tinygpt.data.dialogs import Message
from tinygpt.errors import TinyGPTError
from tinygpt.export.targets import family_of
from tinygpt.infer.generate import generate_ids

transformers = pytest.importorskip("transformers")
GPT2_RANKS = SHARED_DATA / "gpt2.tiktoken"

# Text with what tokenizers get wrong: digits, runs of spaces, newlines and tabs, accents, an emoji.
SAMPLE = "Hello  world!\n\n  12345 and 3.14\tcafé naïve 🙂 end"
# case -> (preset, expected class, extra flags); chat presets train on the built-in conversations
CASES = {
    "cpu-tiny": ("cpu-tiny", "GPT2LMHeadModel", ["--tokenizer", "char"]),
    "micropgpt": ("micropgpt", "GPT2LMHeadModel", ["--tokenizer", "char"]),
    "gpt2": ("gpt2", "GPT2LMHeadModel", ["--data.vocab_size", "300"]),
    "gpt2-no-bias": ("gpt2", "GPT2LMHeadModel", ["--data.vocab_size", "300", "--model.bias", "false"]),
    "modern": ("modern", "Qwen3ForCausalLM", ["--data.vocab_size", "300"]),
    "modern-relu2": ("modern", "ApertusForCausalLM", ["--data.vocab_size", "300", "--model.mlp", "relu2"]),
    "gpt-lite": ("gpt-lite", "OpenAIGPTLMHeadModel", []),
    "microgpt": ("microgpt", "GPT2LMHeadModel", ["--data.gpt2_ranks", str(GPT2_RANKS)]),
    "litegpt": ("litegpt", "GPT2LMHeadModel", ["--data.gpt2_ranks", str(GPT2_RANKS)]),
}


def train_tiny(tmp_path, name: str, preset: str, text_file, extra: list[str]):
    data = [] if preset == "litegpt" else ["--data", str(text_file)]
    if preset in ("cpu-tiny", "micropgpt", "gpt-lite"):  # char: the sample's characters must be known
        text_file.write_text(text_file.read_text() + SAMPLE + "\n")
    out = tmp_path / name
    assert main(["train", "--preset", preset, "--out", str(out), *data, *extra, *tiny_flags()]) == 0
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_hf_export_matches_transformers(tmp_path, text_file, name):
    preset, hf_class, extra = CASES[name]
    if "gpt2_ranks" in " ".join(extra) and not GPT2_RANKS.exists():
        pytest.skip(f"{GPT2_RANKS} not found")
    run = train_tiny(tmp_path, name, preset, text_file, extra)
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    assert type(model).__name__ == hf_class
    ours = tinygpt_run.load(run, device="cpu")
    ours.model.eval()  # gpt-lite and litegpt train with dropout

    text = SAMPLE + " " + " ".join(ours.tokenizer.special_tokens)
    ids = ours.tokenizer.encode(text, allow_special=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == ours.tokenizer.decode(ids)

    idx = torch.tensor([ids[:16]])
    with torch.no_grad():
        diff = (ours.model(idx)[0] - model(idx).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e}"

    prompt = idx[:, :6]
    greedy = generate_ids(ours.model, prompt, SampleConfig(max_new_tokens=10, temperature=0.0))
    # An explicit mask: otherwise transformers masks every prompt token that equals pad_token_id.
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=10,
                            min_new_tokens=10, eos_token_id=None, pad_token_id=0)
    eos = set(json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"])
    # transformers never picks EOS here
    n = next((i for i, t in enumerate(greedy[0, 6:].tolist()) if t in eos), 10)
    assert theirs[0, : 6 + n].tolist() == greedy[0, : 6 + n].tolist()


def test_chat_template_renders_what_tinygpt_trains_on(tmp_path):
    out = tmp_path / "chat"
    # built-in chats
    assert main(["train", "--out", str(out), *tiny_flags(), "--data.vocab_size", "400"]) == 0
    assert main(["export", "--run", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = tinygpt_run.load(out, device="cpu")
    template = tinygpt_run.chat_template(ours)
    conv = [Message("system", "be brief"), Message("user", "what is 2 plus 3?"), Message("assistant", "5"),
            Message("user", "and  café 🙂?")]
    messages = [{"role": m.role, "content": m.content} for m in conv]
    for open_reply in (True, False):
        ids, _ = template.render(ours.tokenizer, conv, open_reply=open_reply)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_reply)
        assert text == ours.tokenizer.decode(ids)
        assert tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=open_reply,
                                       return_dict=False) == ids


@pytest.mark.parametrize("override, reason", [
    (dict(head="adaptive"), "adaptive softmax"),
    (dict(pos="rope", norm="layernorm"), "nearest"),
    (dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=False, bias=False), "qk_norm=False"),
])
def test_architectures_without_target_are_refused(override, reason):
    with pytest.raises(TinyGPTError, match=reason):
        family_of(ModelConfig(vocab_size=100, **override))


def test_export_refusals_write_nothing(tmp_path, text_file, capsys):
    run = tmp_path / "tiny"
    assert main(["train", "--preset", "tinygpt", "--data", str(text_file), "--data.vocab_size", "300",
                 "--out", str(run), *tiny_flags()]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "a")]) == 1
    assert "adaptive softmax" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["export", "--run", str(tmp_path / "missing"), "--format", "hf", "--out",
                 str(tmp_path / "b")]) != 0
    assert "missing" in capsys.readouterr().err and not (tmp_path / "b").exists()
    good = train_tiny(tmp_path, "gpt2", "gpt2", text_file, ["--data.vocab_size", "300"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", "--run", str(good), "--format", "hf", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert main(["export", "--run", str(good), "--format", "hf", "--out", str(tmp_path / "taken"),
                 "--overwrite"]) == 0
    assert (tmp_path / "taken" / "config.json").is_file() and not (tmp_path / "taken" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
