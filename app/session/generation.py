"""Sampling a reply into the cache, token by token, for the local engine.

The reply streams to the caller as text; an end-of-turn marker that the model writes as
text (not one special token of its vocabulary) ends the reply and is cut from it.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.core.metrics import TurnMetrics
from app.domain import FinishReason
from app.session.engine import GenerationOptions, TokenCallback

if TYPE_CHECKING:
    from app.core.kv_mirror import KVMirror
    from app.core.llama_backend import LlamaBackend


@dataclass
class GeneratedReply:
    finish: FinishReason
    tokens: list[int] = field(default_factory=list)  # the reply's content tokens
    text: str = ""


class ReplyText:
    """A reply's text as it streams, cut at the end-of-turn marker when the model writes
    it as text (a marker that is not one special token of its vocabulary, e.g. ChatML's
    ``<|im_end|>`` on Gemma). Text that may be the marker's beginning is held back, so
    the marker never reaches the screen, the stored reply or its token ids."""

    def __init__(self, end_text: str, on_token: TokenCallback | None) -> None:
        self.end_text = end_text
        self.on_token = on_token
        self.text = ""
        self.ends: list[int] = [0]  # the text's length after each token
        self.shown = 0
        self.ended = False

    def add(self, piece: str) -> bool:
        """Add a token's text; True when the marker is complete (the reply ends before it)."""
        self.text += piece
        self.ends.append(len(self.text))
        if not self.end_text:
            self._show(len(self.text))
            return False
        at = self.text.find(self.end_text, max(0, self.shown - len(self.end_text)))
        if at >= 0:
            self.text = self.text[:at]
            self.ended = True
            self._show(at)
            return True
        held = next(
            (
                size
                for size in range(min(len(self.end_text) - 1, len(self.text)), 0, -1)
                if self.end_text.startswith(self.text[-size:])
            ),
            0,
        )
        self._show(len(self.text) - held)
        return False

    def tokens_before_end(self) -> int | None:
        """How many tokens hold exactly the reply before the marker; None when the marker
        starts inside a token (the reply's text is then tokenized again)."""
        cut = len(self.text)
        return self.ends.index(cut) if cut in self.ends else None

    def flush(self) -> None:
        self._show(len(self.text))

    def _show(self, upto: int) -> None:
        if upto > self.shown:
            if self.on_token is not None:
                self.on_token(self.text[self.shown : upto])
            self.shown = upto


class ReplyStream:
    """One reply being sampled: its tokens, its text (cut at the end-of-turn marker) and
    why it ended (None while it goes on)."""

    def __init__(
        self,
        backend: LlamaBackend,
        end_token: int | None,
        end_text: str,
        on_token: TokenCallback | None,
    ) -> None:
        self.backend = backend
        self.end_token = end_token
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ReplyText(end_text, on_token)
        self.content: list[int] = []
        self.finish: FinishReason | None = None

    def take(self, token: int) -> bool:
        """Add a sampled token; True when the reply ended with it (not to be evaluated)."""
        backend = self.backend
        if backend.is_end_of_generation(token) or token == self.end_token:
            self.finish = FinishReason.STOP
            return True
        self.content.append(token)
        if self.text.add(self.decoder.decode(backend.token_bytes(token))):
            self.finish = FinishReason.STOP  # the end-of-turn marker, written as text
            kept = self.text.tokens_before_end()
            self.content[:] = (
                self.content[:kept]
                if kept is not None
                else backend.tokenize(self.text.text, special=False)
            )
            return True
        return False

    def close(self, finish: FinishReason) -> GeneratedReply:
        """The reply as stored; ``finish`` unless it ended by itself."""
        if not self.text.ended:
            self.text.add(self.decoder.decode(b"", final=True))
        self.text.flush()
        self.finish = self.finish or finish
        return GeneratedReply(self.finish, self.content, self.text.text)


def generate_reply(
    backend: LlamaBackend,
    mirror: KVMirror,
    end_token: int | None,
    end_text: str,
    options: GenerationOptions,
    metrics: TurnMetrics,
    started: float,
    on_token: TokenCallback | None,
    cancel: threading.Event | None,
) -> GeneratedReply:
    """Sample up to ``options.max_tokens`` after the prompt the cache ends with; each
    token but the last is evaluated into the cache. Fills the decode figures and TTFT."""
    stream = ReplyStream(backend, end_token, end_text, on_token)
    finish = FinishReason.LENGTH
    decode_started = time.perf_counter()
    with backend.make_sampler(options.temperature, options.seed, options.sampling) as sampler:
        for index in range(options.max_tokens):
            if cancel is not None and cancel.is_set():
                finish = FinishReason.CANCELLED
                break
            token = sampler.sample()
            if index == 0:
                metrics.ttft_ms = (time.perf_counter() - started) * 1000
                decode_started = time.perf_counter()
            if stream.take(token):
                break
            if index == options.max_tokens - 1:
                break  # the last token need not be evaluated
            if not mirror.append(token):
                finish = FinishReason.CONTEXT_FULL
                break
    reply = stream.close(finish)
    content = reply.tokens
    metrics.decode_tokens = len(content)
    metrics.decode_ms = (time.perf_counter() - decode_started) * 1000
    if metrics.decode_ms > 0 and len(content) > 1:
        metrics.decode_tokens_per_s = (len(content) - 1) / (metrics.decode_ms / 1000)
    return reply
