"""Instruction-following eval per prompt layout (``python -m app eval``; no Qt)."""
