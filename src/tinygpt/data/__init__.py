"""Data: reading files and conversations, preparing token files, and the batches training and evaluation
read."""
