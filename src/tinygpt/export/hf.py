"""Export a run as a Hugging Face transformers folder that loads with no custom code.

`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` read it with
trust_remote_code off: config.json for the class that computes exactly this network (export/targets.py),
model.safetensors in that class's names, tokenizer.json (export/vocab.py) with tokenizer_config.json, the chat
template as Jinja for chat runs, and generation_config.json from the run's sampling defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tinygpt.checkpoint import Checkpoint
from tinygpt.config import ModelConfig
from tinygpt.data.templates import ChatTemplate
from tinygpt.export.output import staged
from tinygpt.export.targets import Family, family_of, with_zero_biases
from tinygpt.export.vocab import hf_tokenizer
from tinygpt.init_from import GPT2_TRANSPOSED
from tinygpt.model import ROPE_BASE, mlp_hidden
from tinygpt.tokenizer import EOT, Tokenizer


def gpt2_state(sd: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """GPT-2 and GPT-1 keep tinygpt's names, but their linear layers are Conv1D (transposed weights). GPT-1
    calls
    the embeddings tokens_embed/positions_embed, and tinygpt's fixed sinusoid table becomes its learned
    one."""
    out = {}
    for name, w in sd.items():
        out[name] = w.t() if name.endswith(GPT2_TRANSPOSED) else w
    if family.name == "openai-gpt":
        out["transformer.tokens_embed.weight"] = out.pop("transformer.wte.weight")
    return out


def llama_like_state(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                     family: Family) -> dict[str, torch.Tensor]:
    """Apertus and Qwen3 name things as LLaMA does; c_attn splits into q, k, v (rows, in that order, as
    CausalSelfAttention splits its output), and SwiGLU's c_fc into gate then up (SwiGLU.forward's chunk)."""
    norms = ("attention_layernorm", "feedforward_layernorm") if family.name == "apertus" else \
        ("input_layernorm", "post_attention_layernorm")
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        t, h = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = sd[t + "attn.c_attn.weight"].chunk(3)
        out |= {h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v,
                h + "self_attn.o_proj.weight": sd[t + "attn.c_proj.weight"],
                h + "self_attn.q_norm.weight": sd[t + "attn.q_norm.weight"],
                h + "self_attn.k_norm.weight": sd[t + "attn.k_norm.weight"],
                h + norms[0] + ".weight": sd[t + "ln_1.weight"],
                h + norms[1] + ".weight": sd[t + "ln_2.weight"],
                h + "mlp.down_proj.weight": sd[t + "mlp.c_proj.weight"]}
        if family.name == "qwen3":
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = (
                sd[t + "mlp.c_fc.weight"].chunk(2))
        else:
            out[h + "mlp.up_proj.weight"] = sd[t + "mlp.c_fc.weight"]
    return out


def hf_state(model: torch.nn.Module, family: Family) -> dict[str, torch.Tensor]:
    """The model's weights in the target class's names and layouts (float32, CPU, contiguous). A tied output
    layer is left out: transformers ties it to the embedding on load (and safetensors refuses shared
    storage)."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if family.name == "gpt2":
        sd = with_zero_biases(sd)
    if family.name == "openai-gpt":  # the sinusoid table is a buffer, not saved in tinygpt's state dict
        sd["transformer.positions_embed.weight"] = model.transformer.wpe.table.float().cpu()
    out = (gpt2_state(sd, family) if family.name in ("gpt2", "openai-gpt")
           else llama_like_state(sd, cfg, family))
    if cfg.tie_weights:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, family: Family, tok: Tokenizer) -> dict[str, Any]:
    common = dict(architectures=[family.hf_class], vocab_size=cfg.vocab_size,
                  tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, dtype="float32")
    if family.name in ("gpt2", "openai-gpt"):
        gpt = dict(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                   layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        if family.name == "openai-gpt":
            return dict(common, model_type="openai-gpt", afn=cfg.mlp, **gpt)
        return dict(common, model_type="gpt2", n_inner=cfg.mlp_hidden, activation_function="gelu_new",
                    n_ctx=cfg.block_size,
                    scale_attn_weights=True, **gpt)
    # Apertus installs llama3 RoPE scaling at theta 1.2e7 when rope_parameters is missing, and Qwen3 defaults
    # head_dim to 128 and rms_norm_eps to 1e-6: every such field is written out (5.x reads rope_parameters,
    # 4.x rope_theta and rope_scaling).
    return dict(common, model_type=family.name, hidden_size=cfg.n_embd, intermediate_size=mlp_hidden(cfg),
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                head_dim=cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.block_size, rms_norm_eps=1e-5,
                hidden_act="relu2" if family.name == "apertus" else "silu", attention_bias=False,
                attention_dropout=0.0,
                rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE}, rope_theta=ROPE_BASE,
                rope_scaling=None, use_sliding_window=False, pad_token_id=None)


def tokenizer_config(tok: Tokenizer, block_size: int, template: ChatTemplate | None) -> dict[str, Any]:
    """What AutoTokenizer reads beside tokenizer.json. Decoding must not "clean up" spaces before punctuation
    (transformers' default for some classes), or decoded text would differ from tinygpt's."""
    config: dict[str, Any] = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=block_size,
                                  eos_token=EOT, bos_token=EOT, pad_token=None, unk_token=None,
                                  clean_up_tokenization_spaces=False, add_bos_token=False,
                                  add_eos_token=False)
    if template is not None:
        config["chat_template"] = template.jinja()
    return config


def generation_config(ckpt: Checkpoint, template: ChatTemplate | None) -> dict[str, Any]:
    """The run's sampling defaults; a chat reply also ends at the template's stop markers."""
    s, tok = ckpt.config.sample, ckpt.tokenizer
    stops = template.stop_ids(tok) if template else [tok.eot_id]
    config: dict[str, Any] = dict(bos_token_id=tok.eot_id, eos_token_id=stops, pad_token_id=tok.eot_id,
                                  max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0)
    if s.temperature > 0:
        config.update(temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p or 1.0)
    return config


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(ckpt: Checkpoint, out: Path, template: ChatTemplate | None, overwrite: bool = False) -> Path:
    """Write the folder `out` (see the module docstring); nothing is written when the model has no target."""
    family = family_of(ckpt.config.model)
    with staged(out, overwrite, folder=True) as tmp:
        tensors = hf_state(ckpt.model, family)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(ckpt.config.model, family, ckpt.tokenizer))
        write_json(tmp / "generation_config.json", generation_config(ckpt, template))
        hf_tokenizer(ckpt.tokenizer).save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(ckpt.tokenizer,
                                                                   ckpt.config.model.block_size, template))
    return out
