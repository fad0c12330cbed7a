"""Decoding: the KV caches, sampling, the decode loop and generate(), continuous batching and the chat
session."""
