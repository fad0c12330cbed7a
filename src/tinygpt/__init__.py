"""tinygpt: train a small GPT on your own text, then sample, chat and evaluate.

The Python API in a few names::

    import tinygpt
    run = tinygpt.load("runs/shakespeare-char")                # model, tokenizer and config of a trained run
    print(tinygpt.generate(run, "ROMEO:", max_new_tokens=100))  # text, sampled with the run's own settings

and, for building things yourself, GPT and ModelConfig (the network), Config and SampleConfig (settings).
"""

from tinygpt.config import Config, ModelConfig, SampleConfig
from tinygpt.infer.generate import generate
from tinygpt.model import GPT
from tinygpt.run import load

__version__ = "0.1.0"
__all__ = ["GPT", "Config", "ModelConfig", "SampleConfig", "generate", "load", "__version__"]
