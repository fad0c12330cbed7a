"""Decoding: sampling, the KV-cached decode loop, generate() and the chat session."""
