"""The model layer over llama.cpp: backend, chat templates, prompts and the KV mirror.

No Qt and no storage here.
"""
