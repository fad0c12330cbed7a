"""tinygpt: train a small GPT on your own text, then sample, chat and evaluate."""

__version__ = "0.1.0"
