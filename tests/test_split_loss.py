import math

import numpy as np
import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.data.batches import Split
from tinygpt.model import GPT
from tinygpt.split_loss import loss_metrics, loss_over
from tinygpt.tokenizer import build_tokenizer


def test_bits_per_byte_counts_utf8_bytes_and_skips_specials():
    tok = build_tokenizer("char", ["ab\u00e9"])  # é is 2 bytes in UTF-8
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=tok.vocab_size))
    ids = np.array(tok.encode("ab\u00e9a") + [tok.eot_id] + tok.encode("bab\u00e9"), dtype=np.uint16)
    s = loss_over(model, Split(ids), 4, torch.device("cpu"), tokenizer=tok)
    assert s.targets == 8  # two windows of 4 targets
    # targets: "b\u00e9a<eot>" and "bab\u00e9": the EOT counts no bytes, each é two
    assert s.bytes == len("b\u00e9a".encode()) + len("bab\u00e9".encode())
    m = loss_metrics(s)
    assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["bits_per_byte"] == pytest.approx(s.nats / math.log(2) / s.bytes)


@pytest.mark.parametrize("windows", [5, 6, 7])
def test_the_shares_of_two_processes_add_up_to_the_whole(windows):
    """An odd number of windows pads the second share with a window it does not score; the sums over the
    shares equal one process's sum."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11))
    split = Split(np.arange(4 * windows + 1, dtype=np.uint16) % 11)
    whole = loss_over(model, split, 2, torch.device("cpu"))
    shares = [loss_over(model, split, 2, torch.device("cpu"), shard=(rank, 2)) for rank in (0, 1)]
    assert whole.targets == 4 * windows == sum(s.targets for s in shares)
    assert sum(s.nats for s in shares) == pytest.approx(whole.nats, rel=1e-5)
