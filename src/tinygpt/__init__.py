"""tinygpt: train a small GPT on your own text, then sample, chat and evaluate.

The Python API in a few names::

    import tinygpt
    run = tinygpt.load("runs/shakespeare-char")                # model, tokenizer and config of a trained run
    print(tinygpt.generate(run, "ROMEO:", max_new_tokens=100))  # text, sampled with the run's own settings

and, for building things yourself, GPT and ModelConfig (the network), Config and SampleConfig (settings);
quantize(model, "int8" | "bfloat16") readies a model for faster decoding (load(..., dtype=...) applies it).
"""

from tinygpt.config import Config, ModelConfig, SampleConfig
from tinygpt.infer.generate import generate
from tinygpt.infer.quantize import quantize
from tinygpt.model import GPT
from tinygpt.run import load

__version__ = "0.1.0"
__all__ = ["GPT", "Config", "ModelConfig", "SampleConfig", "generate", "load", "quantize", "__version__"]
