"""Chats on an OpenAI-compatible server (llama-server, vLLM, SGLang) with the cache visible."""
