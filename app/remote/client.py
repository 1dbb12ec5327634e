"""HTTP client for OpenAI-compatible chat servers (llama-server, vLLM, SGLang, OpenAI).

Only what a chat turn needs: the model list, streamed chat completions with the server's
own token usage and cache figures, and llama-server's extras (``/props``, ``/tokenize``,
slot save/restore). Every failure becomes one :class:`ServerError` line that says what
happened and where; no exception from httpx or JSON parsing leaks to a caller.

A server is not trusted: every answer is decoded against a typed schema
(:mod:`app.remote.schema`), bodies and stream lines are capped, a reply is cut at
``max_tokens``, and a watchdog thread ends a stream that is cancelled or sends no data
event for the timeout (keep-alive comments do not count) by shutting its socket down,
so no caller ever waits on a blocked read.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import msgspec

from app import limits
from app.remote import schema
from app.session.engine import SessionError

API_KEY_VARIABLE = "KVCHAT_API_KEY"
KEYRING_SERVICE = "kvchat"
CONNECT_TIMEOUT_S = 5.0
#: Time without a data event before a reply is abandoned: a long prompt's prefill on a
#: busy server sends nothing for a while (``--server-timeout`` changes it).
DEFAULT_SERVER_TIMEOUT_S = limits.DEFAULT_SERVER_TIMEOUT_S
#: The largest JSON answer, SSE line or reply text accepted from a server.
MAX_BODY_BYTES = 8 << 20
#: How often the watchdog looks at the cancel flag and the data clock.
WATCH_INTERVAL_S = 0.02

__all__ = [
    "API_KEY_VARIABLE",
    "DEFAULT_SERVER_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "ChatCompletion",
    "ServerClient",
    "ServerError",
    "ServerInfo",
    "ServerRefused",
    "StreamDropped",
    "api_key_for",
]

T = TypeVar("T")


def _connect_failure(base_url: str, error: httpx.ConnectError) -> str:
    """A sentence a person can act on, not "[Errno 111] Connection refused"."""
    cause: BaseException | None = error
    for _ in range(8):  # httpx wraps httpcore's error, which wraps the socket's
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError):
            return f"Connection refused: is the server running at {base_url}?"
        cause = cause.__cause__ or cause.__context__
    reason = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error)) or type(error).__name__
    return f"cannot connect to {base_url}: {reason}"


class ServerError(SessionError):
    """The server could not be reached or refused a request (one line)."""


class ServerRefused(ServerError):
    """The server answered a request with an HTTP error status.

    ``status`` and ``server_message`` (its own words, decoded from its error JSON) are
    kept apart from the one-line text, so callers decide by them, never by the line.
    """

    def __init__(self, what: str, status: int, reason: str, server_message: str) -> None:
        said = f": {_one_line(server_message)}" if server_message else ""
        super().__init__(f"{what}: the server answered {status} {reason}{said}")
        self.status = status
        self.server_message = server_message

    @property
    def refused_roles(self) -> bool:
        """The chat template refused the messages' roles (see :func:`schema.refuses_roles`)."""
        return schema.refuses_roles(self.server_message)


class StreamDropped(ServerError):
    """The reply stream ended before the server said it was finished."""

    def __init__(self, message: str, partial: ChatCompletion) -> None:
        super().__init__(message)
        self.partial = partial


class _TooLarge(Exception):
    """A body or a line over :data:`MAX_BODY_BYTES`."""


def api_key_for(base_url: str) -> str | None:
    """The key from ``KVCHAT_API_KEY``, else the OS keyring (never from the database)."""
    key = os.environ.get(API_KEY_VARIABLE)
    if key:
        return key
    try:
        import keyring
        import keyring.errors

        try:
            return keyring.get_password(KEYRING_SERVICE, base_url)
        except keyring.errors.KeyringError:
            return None
    except ImportError:  # pragma: no cover - keyring is a dependency
        return None


@dataclass
class ServerInfo:
    """What the server says about itself, for the inspector and the status bar."""

    base_url: str
    model: str
    models: list[str]
    kind: str  # "llama-server" or "openai-compatible"
    n_ctx: int = 0
    total_slots: int = 1
    slot_save: bool = False  # /slots/{id}?action=save|restore works (--slot-save-path)
    build: str = ""

    @property
    def features(self) -> list[str]:
        """The cache features this server offers, in words."""
        if self.kind != "llama-server":
            return ["prefix caching (reported as usage cached_tokens, if the server does)"]
        found = ["prompt cache (cache_prompt)", f"{self.total_slots} slot(s) pinned by id_slot"]
        found.append(
            "slot save/restore" if self.slot_save else "no slot save (no --slot-save-path)"
        )
        return found

    def summary(self) -> str:
        """One line for the status bar and the connect dialog: kind, model, cache features."""
        model = self.model.rsplit("/", 1)[-1]
        context = f", n_ctx {self.n_ctx}" if self.n_ctx else ""
        return f"{self.kind}: {model}{context} · " + "; ".join(self.features)


@dataclass
class ChatCompletion:
    """One streamed chat completion as the client saw it."""

    parts: list[str] = field(default_factory=list)  # the reply's pieces, joined once
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    timings: dict[str, float] = field(default_factory=dict)  # llama-server's timings
    ttft_ms: float = 0.0  # request sent → first content (client clock)
    decode_ms: float = 0.0  # first content → last content
    cancelled: bool = False
    cut: str = ""  # why the client ended a reply the server was still sending
    clamped: list[str] = field(default_factory=list)  # the server's impossible figures

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def pieces(self) -> int:
        return len(self.parts)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens the server took from its cache (its own figure)."""
        if "cache_n" in self.timings:
            return int(self.timings["cache_n"])
        return self.cached_tokens or 0

    @property
    def evaluated_tokens(self) -> int:
        if "prompt_n" in self.timings:
            return int(self.timings["prompt_n"])
        return max(0, self.prompt_tokens - self.reused_tokens)

    def _fix(self, name: str, value: float, low: float, high: float) -> float:
        fixed = min(max(value, low), high)
        if fixed != value:
            self.clamped.append(f"{name} {value:g} → {fixed:g}")
        return fixed

    def clamp(self, max_tokens: int) -> None:
        """Bring the server's figures into what is possible (0 ≤ cached ≤ prompt tokens, no
        negative counts or times), naming each one that was changed in ``clamped``."""
        self.prompt_tokens = int(self._fix("prompt tokens", self.prompt_tokens, 0, math.inf))
        self.completion_tokens = int(
            self._fix("completion tokens", self.completion_tokens, 0, max(max_tokens, 1))
        )
        prompt = self.prompt_tokens
        if self.cached_tokens is not None:
            self.cached_tokens = int(self._fix("cached tokens", self.cached_tokens, 0, prompt))
        bound = prompt if prompt > 0 else math.inf  # timings without usage: no prompt size
        for name, value in list(self.timings.items()):
            high = bound if name in ("cache_n", "prompt_n") else math.inf
            self.timings[name] = self._fix(f"timings.{name}", value, 0, high)


def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _one_line(text: str, size: int = 300) -> str:
    return " ".join(text.split())[:size]


def _read_capped(response: httpx.Response, cap: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused (:class:`_TooLarge`) past ``cap`` bytes instead of held whole."""
    parts: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


def _lines(chunks: Iterator[bytes], cap: int = MAX_BODY_BYTES) -> Iterator[bytes]:
    """Lines of a byte stream, each refused (:class:`_TooLarge`) past ``cap`` bytes."""
    pending: list[bytes] = []
    size = 0
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if size + end - start > cap:
                raise _TooLarge
            pending.append(chunk[start:end])
            yield b"".join(pending).rstrip(b"\r")
            pending.clear()
            size = 0
            start = end + 1
        size += len(chunk) - start
        if size > cap:
            raise _TooLarge
        pending.append(chunk[start:])
    if size:
        yield b"".join(pending)


def _refusal(response: httpx.Response, what: str) -> ServerRefused:
    """The error answer as a :class:`ServerRefused`: its status and the server's own
    message (decoded from its error JSON; else the body's start)."""
    try:
        body = _read_capped(response, 64 << 10)
    except (_TooLarge, httpx.HTTPError):
        body = b""
    try:
        message = schema.decode(body, schema.ErrorAnswer).text()
    except msgspec.MsgspecError:
        message = ""
    if not message:
        message = body[:200].decode("utf-8", "replace")
    return ServerRefused(what, response.status_code, response.reason_phrase, message)


def _shut(sock: socket.socket) -> None:
    """Wake a read blocked on ``sock`` (closing it from another thread would not)."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """Ends a stream's blocked read from its own thread: when ``cancel`` is set, or when
    no data event came for ``timeout_s`` seconds (keep-alive comments do not count)."""

    def __init__(self, cancel: threading.Event | None, timeout_s: float) -> None:
        self.cancel = cancel
        self.timeout_s = timeout_s
        self.reason = ""  # "cancelled" or "timeout" once it has ended the stream
        self._last_data = time.monotonic()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kvchat-stream-watch", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's ``trace`` extension: keep the connection's socket (TCP, then TLS)."""
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self.reason:
                _shut(sock)

    def data_arrived(self) -> None:
        self._last_data = time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_INTERVAL_S):
            if self.cancelled:
                reason = "cancelled"
            elif time.monotonic() - self._last_data > self.timeout_s:
                reason = "timeout"
            else:
                continue
            with self._lock:
                self.reason = reason
                for sock in self._sockets:
                    _shut(sock)
            return


class _ReplyReader:
    """Folds a stream's ``data:`` events into a :class:`ChatCompletion`, within bounds."""

    def __init__(
        self,
        result: ChatCompletion,
        max_tokens: int,
        on_text: Callable[[str], None] | None,
    ) -> None:
        self.result = result
        self.max_pieces = max(1, max_tokens)  # a piece is at least one token
        self.on_text = on_text
        self.chars = 0
        self.started = False  # the server answered with a stream
        self.finished = False
        self.first = self.last = 0.0

    def read(self, lines: Iterator[bytes], watch: _Watchdog) -> None:
        for line in lines:
            if watch.cancelled:
                self.result.cancelled = True
                return
            if not line.startswith(b"data:"):
                continue  # comments (keep-alives), event names, blank lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.finished = True
                return
            try:
                chunk = schema.decode(payload, schema.Chunk)
            except msgspec.MsgspecError as error:
                raise ServerError(
                    f"the server sent a reply event that is not a chat completion chunk "
                    f"({_one_line(str(error))}); the reply is refused"
                ) from error
            watch.data_arrived()
            if chunk.error is not None:
                failure = chunk.error
                message = failure if isinstance(failure, str) else failure.message
                raise StreamDropped(
                    f"the server stopped the reply with an error: {_one_line(message)}",
                    self.result,
                )
            if self._fold(chunk):
                return

    def _fold(self, chunk: schema.Chunk) -> bool:
        """Add one chunk; True when the reply is cut (over max_tokens or the size cap)."""
        result = self.result
        for choice in chunk.choices:
            text = choice.delta.content if choice.delta is not None else None
            if text:
                if result.pieces >= self.max_pieces or self.chars + len(text) > MAX_BODY_BYTES:
                    limit = "max_tokens" if result.pieces >= self.max_pieces else "the size cap"
                    result.cut = f"the server sent more than {limit} allows; the reply is cut"
                    result.finish_reason = "length"
                    return True
                result.parts.append(text)
                self.chars += len(text)
                self.last = time.perf_counter()
                self.first = self.first or self.last
                if self.on_text is not None:
                    self.on_text(text)
            if choice.finish_reason:
                result.finish_reason = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
            result.prompt_tokens = usage.prompt_tokens
            result.completion_tokens = usage.completion_tokens
            details = usage.prompt_tokens_details
            if details is not None and details.cached_tokens is not None:
                result.cached_tokens = details.cached_tokens
        if chunk.timings is not None:
            found = msgspec.structs.asdict(chunk.timings)
            result.timings = {k: float(v) for k, v in found.items() if v is not None}
        return False


class ServerClient:
    """One server: its base URL (``http://host:port/v1``), model name and optional API key.

    ``read_timeout`` bounds the time without data: per read for plain requests, and
    between data events for a streamed reply (keep-alive comments do not reset it).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_SERVER_TIMEOUT_S,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ServerError(f"the server URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.root = _root(self.base_url)
        self.requested_model = model
        self.timeout_s = read_timeout
        key = api_key if api_key is not None else api_key_for(self.base_url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._http = httpx.Client(headers=headers, timeout=timeout)
        # A reply stream gets a connection of its own (never kept for another request),
        # so the watchdog can shut that connection's socket down.
        self._streams = httpx.Client(
            headers=headers, timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.info: ServerInfo | None = None

    def close(self) -> None:
        self._http.close()
        self._streams.close()

    # -- plain requests ---------------------------------------------------------------

    @contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """Turn transport errors into one line naming the URL."""
        try:
            yield
        except (httpx.HTTPError, httpx.InvalidURL, _TooLarge) as error:
            raise self._transport_error(error, what) from error

    def _transport_error(self, error: Exception, what: str) -> ServerError:
        if isinstance(error, httpx.ConnectError):
            return ServerError(_connect_failure(self.base_url, error))
        if isinstance(error, httpx.TimeoutException):
            return ServerError(f"{self.base_url} did not answer in time ({what})")
        if isinstance(error, httpx.InvalidURL):
            return ServerError(f"not a usable server URL: {self.base_url} ({error})")
        if isinstance(error, _TooLarge):
            return ServerError(
                f"{what}: the answer from {self.base_url} is larger than "
                f"{MAX_BODY_BYTES >> 20} MB; refused"
            )
        return ServerError(f"{what} at {self.base_url} failed: {_one_line(str(error))}")

    def _body(
        self, method: str, url: str, what: str, cancel: threading.Event | None = None, **kwargs: Any
    ) -> bytes:
        """The answer's body; with ``cancel``, on a connection of its own that the watchdog
        ends when ``cancel`` is set (a request during a turn never outlasts Stop)."""
        if cancel is None:
            return self._read_body(self._http, method, url, what, **kwargs)
        with _Watchdog(cancel, self.timeout_s) as watch:
            try:
                body = self._read_body(
                    self._streams, method, url, what, extensions={"trace": watch.trace}, **kwargs
                )
            except ServerError:
                if not watch.reason:
                    raise
            if watch.reason == "cancelled":  # the body may have ended where the socket was shut
                raise ServerError(f"{what}: cancelled")
            if watch.reason:
                raise ServerError(f"{self.base_url} sent nothing for {self.timeout_s:g} s ({what})")
            return body

    def _read_body(
        self, client: httpx.Client, method: str, url: str, what: str, **kwargs: Any
    ) -> bytes:
        with self._failures(what), client.stream(method, url, **kwargs) as response:
            if response.status_code >= 400:
                raise _refusal(response, what)
            return _read_capped(response)

    def _request(self, method: str, url: str, what: str, shape: type[T], **kwargs: Any) -> T:
        """A JSON answer decoded as ``shape``; any other answer is one line."""
        body = self._body(method, url, what, **kwargs)
        try:
            return schema.decode(body, shape)
        except msgspec.MsgspecError as error:
            raise ServerError(
                f"{what}: the answer from {url} is not what an OpenAI-compatible server sends "
                f"({_one_line(str(error))})"
            ) from error

    def models(self) -> list[str]:
        answer = self._request("GET", f"{self.base_url}/models", "listing models", schema.ModelList)
        return [entry.id for entry in answer.data]

    def connect(self) -> ServerInfo:
        """Check the URL and the model, and learn what the server offers."""
        models = self.models()
        if not models:
            raise ServerError(f"{self.base_url} serves no model")
        model = self.requested_model or models[0]
        if model not in models:
            raise ServerError(
                f"the server at {self.base_url} has no model named {model!r}; "
                f"it serves: {', '.join(models)}"
            )
        info = ServerInfo(self.base_url, model, models, "openai-compatible")
        props = self._props()
        if props is not None:
            info.kind = "llama-server"
            info.n_ctx = props.default_generation_settings.n_ctx
            info.total_slots = props.total_slots
            info.build = _one_line(props.build_info, 200)
            info.slot_save = self._slot_actions_work()
        self.info = info
        return info

    def _props(self) -> schema.Props | None:
        """llama-server's ``/props``; None from a server without it (or with another one)."""
        url = f"{self.root}/props"
        try:
            with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    return None
                body = _read_capped(response)
        except httpx.HTTPError:
            return None
        except _TooLarge as error:
            raise ServerError(f"the server's /props at {self.root} is too large") from error
        if not schema.is_llama_props(body):
            return None
        try:
            return schema.decode(body, schema.Props)
        except msgspec.MsgspecError as error:
            raise ServerError(
                f"the server's /props at {self.root} is not what llama-server sends "
                f"({_one_line(str(error))})"
            ) from error

    def _slot_actions_work(self) -> bool:
        """llama-server answers 501 to slot actions unless it runs with --slot-save-path.

        The probe is an unknown action: refused as invalid (400) when slot actions work,
        and it touches no slot.
        """
        try:
            with self._http.stream(
                "POST", f"{self.root}/slots/0", params={"action": "kvchat-probe"}, json={}
            ) as response:
                return response.status_code == 400
        except httpx.HTTPError:
            return False

    def tokenize(self, text: str, cancel: threading.Event | None = None) -> int | None:
        """Tokens in ``text`` as the server counts them (None if it cannot say or cancelled)."""
        try:
            answer = self._request(
                "POST",
                f"{self.root}/tokenize",
                "tokenizing",
                schema.Tokens,
                cancel=cancel,
                json={"content": text},
            )
        except ServerError:
            return None
        return len(answer.tokens)

    def slot_action(self, slot: int, action: str, filename: str) -> schema.SlotAction:
        """llama-server ``/slots/{id}?action=save|restore|erase`` (a file name on the server)."""
        return self._request(
            "POST",
            f"{self.root}/slots/{slot}",
            f"slot {action}",
            schema.SlotAction,
            params={"action": action},
            json={"filename": filename},
        )

    # -- chat completions ---------------------------------------------------------------

    def _chat_body(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        temperature: float,
        seed: int | None,
        sampling: dict[str, float] | None,
        slot: int | None,
        reuse: bool,
    ) -> dict[str, Any]:
        model = self.info.model if self.info else self.requested_model
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if seed is not None:
            body["seed"] = seed
        if sampling:  # OpenAI's top_p; llama-server also reads top_k, min_p, repeat_penalty
            body.update(sampling)
        if self.info is not None and self.info.kind == "llama-server":
            body["cache_prompt"] = reuse
            if slot is not None:
                body["id_slot"] = slot
        return body

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        seed: int | None = None,
        sampling: dict[str, float] | None = None,
        slot: int | None = None,
        reuse: bool = True,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ChatCompletion:
        """Stream one chat completion; the reply so far survives a dropped stream.

        A dropped stream raises :class:`StreamDropped` carrying the partial completion;
        ``cancel`` ends the reply within the watchdog's interval even while the server
        sends nothing (the completion is then marked cancelled).
        """
        body = self._chat_body(messages, max_tokens, temperature, seed, sampling, slot, reuse)
        result = ChatCompletion()
        reader = _ReplyReader(result, max_tokens, on_text)
        url = f"{self.base_url}/chat/completions"
        sent = time.perf_counter()
        with _Watchdog(cancel, self.timeout_s) as watch:
            try:
                with self._streams.stream(
                    "POST",
                    url,
                    json=body,
                    headers={"Accept-Encoding": "identity"},
                    extensions={"trace": watch.trace},
                ) as response:
                    if response.status_code >= 400:
                        raise _refusal(response, "chat completion")
                    reader.started = True
                    reader.read(_lines(response.iter_bytes()), watch)
            except (httpx.HTTPError, httpx.InvalidURL, _TooLarge) as error:
                self._stream_failed(error, watch, reader)
            else:
                if watch.reason and not (reader.finished or result.cut):
                    self._stream_failed(None, watch, reader)  # a body read until close
        if not (reader.finished or result.cancelled or result.finish_reason or result.cut):
            raise StreamDropped(
                f"the server closed the reply stream after {result.pieces} pieces "
                "without finishing",
                result,
            )
        result.clamp(max_tokens)
        if reader.first:
            result.ttft_ms = (reader.first - sent) * 1000
            result.decode_ms = (reader.last - reader.first) * 1000
        return result

    def _stream_failed(
        self, error: Exception | None, watch: _Watchdog, reader: _ReplyReader
    ) -> None:
        """One line for a stream that failed; a cancelled one simply ends."""
        result = reader.result
        if watch.reason == "cancelled" or (watch.cancelled and not watch.reason):
            result.cancelled = True
            return
        if watch.reason == "timeout" or isinstance(error, httpx.ReadTimeout):
            message = (
                f"{self.base_url} sent no data for {self.timeout_s:g} s (keep-alives do not "
                "count); the reply is abandoned"
            )
        elif isinstance(error, _TooLarge):
            raise ServerError(
                f"a line of the reply from {self.base_url} is larger than "
                f"{MAX_BODY_BYTES >> 20} MB; the reply is refused"
            ) from error
        elif error is not None and not reader.started:
            raise self._transport_error(error, "chat completion") from error
        else:
            message = (
                f"the server dropped the reply stream after {result.pieces} pieces "
                f"({type(error).__name__})"
            )
        if result.parts:
            raise StreamDropped(message, result) from error
        raise ServerError(message) from error
