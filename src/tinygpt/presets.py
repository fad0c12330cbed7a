"""Named recipes: the five projects tinygpt unifies, the modern default and the GPT-2 baseline.

A preset is a layer of overrides applied on top of the dataclass defaults (config.resolve), so adding one
never touches the schema or its validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    description: str
    overrides: dict[str, Any]


GPT2_ARCH = dict(pos="learned", norm="layernorm", norm_placement="pre", mlp="gelu", bias=True,
                 tie_weights=True,
                 head="linear", attn="sdpa", qk_norm=False, zero_init_proj=False)

# The size and schedule that modern and its gpt2 baseline share, so they differ only in the recipe.
SMALL = dict(n_layer=4, n_head=6, n_embd=192, block_size=128, dropout=0.0)
SMALL_TRAIN = dict(max_iters=900, batch_size=16, lr=2e-3, warmup_iters=50, weight_decay=0.1, beta1=0.9,
                   beta2=0.95,
                   grad_clip=1.0, eval_interval=300, checkpoint_interval=300)

PRESETS: dict[str, Preset] = {
    "modern": Preset(
        "The default. A 2M-parameter GPT with today's choices: rotary positions, RMSNorm, no biases, SwiGLU "
        "MLP, QK-norm, zero-initialised output projections, untied head, the Muon optimizer for the blocks' "
        "matrices, a warmup-stable-decay schedule, and a "
        "byte-level BPE tokenizer (2048 ids) trained on your data. docs/presets.md says why each is there.",
        {
            "model": dict(SMALL, bias=False, pos="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu",
                          tie_weights=False, head="linear", attn="sdpa", qk_norm=True, zero_init_proj=True),
            "data": dict(tokenizer="bpe", vocab_size=2048),
            # 300 steps (~4 passes over the built-in corpus): its val loss is lowest there; 900 memorised.
            "train": dict(SMALL_TRAIN, max_iters=300, min_lr=2e-5, schedule="wsd", decay_fraction=0.25,
                          optimizer="muon"),
        },
    ),
    "gpt2": Preset(
        "The GPT-2 recipe at the modern preset's size and data settings (learned positions, pre-LayerNorm, "
        "GELU, biases, tied head, cosine schedule): the baseline the modern preset is measured against.",
        {
            "model": dict(SMALL, **GPT2_ARCH),
            "data": dict(tokenizer="bpe", vocab_size=2048),
            "train": dict(SMALL_TRAIN, min_lr=2e-4, schedule="cosine"),
        },
    ),
    "cpu-tiny": Preset(
        "The classic small CPU recipe: a 0.8M-parameter GPT-2 (learned positions, pre-LayerNorm, "
        "GELU, tied head) trained for 2000 steps. On char-level Tiny Shakespeare it reaches a "
        "val loss near 1.9 in a few minutes on 2 CPU cores.",
        {
            "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, **GPT2_ARCH),
            "train": dict(batch_size=12, grad_accum=1, lr=1e-3, min_lr=1e-4, max_iters=2000,
                          lr_decay_iters=2000,
                          warmup_iters=100, schedule="cosine", beta1=0.9, beta2=0.99, weight_decay=0.1,
                          grad_clip=1.0, eval_interval=250, eval_iters=20),
        },
    ),
    "shakespeare-gpu": Preset(
        "A GPU recipe: reproduces nanoGPT's train_shakespeare_char (config/train_shakespeare_char.py), "
        "which its README reports at val loss 1.4697 in about 3 minutes on one A100. A 10.65M-parameter "
        "GPT-2 without biases (nanoGPT's default), 6 layers, 6 heads, 384 wide, context 256, dropout 0.2, "
        "char-level with the last 10% held out, batch 64, 5000 steps, AdamW (betas 0.9/0.99, weight "
        "decay 0.1, clip 1.0), lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4 at step 5000, "
        "evaluated every 250 steps on 200 batches. On 2 CPU cores a step takes seconds: use a GPU.",
        {
            # nanoGPT's train.py defaults to bias=False and the Shakespeare config keeps it
            "model": dict(GPT2_ARCH, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                          bias=False),
            # nanoGPT's prepare.py: sorted unique characters, the first 90% of the text for training
            "data": dict(tokenizer="char", val_fraction=0.1),
            "train": dict(batch_size=64, grad_accum=1, max_iters=5000, lr=1e-3, min_lr=1e-4,
                          lr_decay_iters=5000, warmup_iters=100, schedule="cosine", optimizer="adamw",
                          beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                          eval_iters=200,
                          # nanoGPT writes a checkpoint only when val improves; the best one is kept here
                          # at every improvement too, so 'last' needs writing only every 1000 steps
                          checkpoint_interval=1000),
        },
    ),
    "litegpt": Preset(
        "LiteGPT: a conversational GPT on the GPT-2 tokenizer with the special tokens <BOS>, <EOS>, <user>:, "
        "<assistant>: (its chat format), GELU, LayerNorm, learned positions, trained as a causal LM on every "
        "token; with no --data it trains on the built-in conversations. LiteGPT's knobs map to MAX_LENGTH="
        "model.block_size, BATCH_SIZE=train.batch_size, EPOCHS=train.epochs, LR=train.lr, MAX_GENERATE_LEN="
        "sample.max_new_tokens, DEFAULT_TEMPERATURE=sample.temperature.",
        {
            "model": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.1, **GPT2_ARCH),
            "data": dict(tokenizer="gpt2", chat_template="litegpt", loss_on="all"),
            "train": dict(epochs=3, batch_size=16, lr=5e-4, min_lr=5e-5, warmup_iters=50, schedule="cosine",
                          eval_interval=200, checkpoint_interval=200),
            "sample": dict(max_new_tokens=100, temperature=0.7, top_k=None),
        },
    ),
    "gpt-lite": Preset(
        "GPT-Lite: a GPT-2-style decoder with static sinusoidal positions, attention computed with einsum, "
        "LayerNorm after attention and after the feed-forward (post-LN) and a two-layer ReLU feed-forward.",
        {
            "model": dict(GPT2_ARCH, n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.1,
                          pos="sinusoidal",
                          norm_placement="post", mlp="relu", attn="einsum"),
            "data": dict(tokenizer="char"),
            "train": dict(max_iters=2000, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                          schedule="cosine",
                          eval_interval=250),
        },
    ),
    "micropgpt": Preset(
        "micropgpt: a character-level model for Tiny Shakespeare: n_embd 384, 4 heads, 4 layers, context "
        "128, AdamW at a constant 3e-4, batch 32, 3000 iterations, an 80/20 train/val split.",
        {
            "model": dict(n_layer=4, n_head=4, n_embd=384, block_size=128, dropout=0.0, **GPT2_ARCH),
            "data": dict(tokenizer="char", val_fraction=0.2),
            "train": dict(max_iters=3000, batch_size=32, lr=3e-4, min_lr=3e-4, warmup_iters=0,
                          schedule="cosine",
                          eval_interval=500),
        },
    ),
    "tinygpt": Preset(
        "TinyGPT: a dialog model with a SentencePiece BPE tokenizer trained on the data (up to 32k ids), 8 "
        "layers, 6 heads, 384 wide, feed-forward 1536, context 128, pre-norm GELU, adaptive softmax output, "
        "dropout 0.05, AdamW with weight decay at 1e-4 (cosine with warm-up), batch 32, 10 epochs, clipping "
        "1.0, early stopping on val loss, its '<s> User: ... <sep> Bot:' prompt format; with no --data it "
        "trains on the built-in conversations.",
        {
            "model": dict(GPT2_ARCH, n_layer=8, n_head=6, n_embd=384, mlp_hidden=1536, block_size=128,
                          dropout=0.05,
                          head="adaptive", tie_weights=False),
            "data": dict(tokenizer="sentencepiece", sp_model_type="bpe", vocab_size=32000,
                         chat_template="tinygpt"),
            "train": dict(epochs=10, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_iters=100, schedule="cosine",
                          weight_decay=0.01, grad_clip=1.0, patience=3, eval_interval=200,
                          checkpoint_interval=200),
        },
    ),
    "microgpt": Preset(
        "MicroGPT: GPT-2 BPE (tiktoken) on your text, n_embd 512, 8 heads, 4 layers, context 512, batch 8, "
        "lr 3e-3, trained by epochs (1), keeping the best checkpoint by val loss; sample with top-k.",
        {
            "model": dict(n_layer=4, n_head=8, n_embd=512, block_size=512, dropout=0.0, **GPT2_ARCH),
            "data": dict(tokenizer="gpt2"),
            "train": dict(epochs=1, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_iters=50, schedule="cosine",
                          eval_interval=100, checkpoint_interval=100),
            "sample": dict(temperature=0.8, top_k=50),
        },
    ),
}
DEFAULT_PRESET = "modern"
