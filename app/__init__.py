"""KV Chat: a desktop chat for local LLMs that makes the KV cache visible and reuses it."""

__version__ = "0.1.0"
