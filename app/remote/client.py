"""HTTP client for OpenAI-compatible chat servers (llama-server, vLLM, SGLang, OpenAI).

Only what a chat turn needs: the model list, streamed chat completions with the server's
own token usage and cache figures, and llama-server's extras (``/props``, ``/tokenize``,
slot save/restore). Every failure becomes one :class:`ServerError` line that says what
happened and where; no exception from httpx or JSON parsing leaks to a caller.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.session.chat_session import SessionError

API_KEY_VARIABLE = "KVCHAT_API_KEY"
KEYRING_SERVICE = "kvchat"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # a long prompt's prefill on a busy server sends nothing for a while

__all__ = [
    "API_KEY_VARIABLE",
    "ChatCompletion",
    "ServerClient",
    "ServerError",
    "ServerInfo",
    "StreamDropped",
    "api_key_for",
]


def _connect_failure(base_url: str, error: httpx.ConnectError) -> str:
    """A sentence a person can act on, not "[Errno 111] Connection refused"."""
    reason = str(error)
    if "refused" in reason.lower():
        return f"Connection refused: is the server running at {base_url}?"
    reason = re.sub(r"^\[Errno -?\d+\]\s*", "", reason) or type(error).__name__
    return f"cannot connect to {base_url}: {reason}"


class ServerError(SessionError):
    """The server could not be reached or refused a request (one line)."""


class StreamDropped(ServerError):
    """The reply stream ended before the server said it was finished."""

    def __init__(self, message: str, partial: ChatCompletion) -> None:
        super().__init__(message)
        self.partial = partial


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


@dataclass
class ChatCompletion:
    """One streamed chat completion as the client saw it."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    timings: dict[str, float] = field(default_factory=dict)  # llama-server's timings
    ttft_ms: float = 0.0  # request sent → first content (client clock)
    decode_ms: float = 0.0  # first content → last content
    pieces: int = 0
    cancelled: bool = False

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


def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _error_text(response: httpx.Response) -> str:
    """The server's own error message, shortened to one line."""
    try:
        body = json.loads(response.read() or b"{}")
    except (ValueError, httpx.HTTPError):
        body = {}
    message = ""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or "")
        elif isinstance(error, str):
            message = error
        message = message or str(body.get("detail", "") or body.get("message", ""))
    if not message:
        try:
            message = response.text[:200]
        except httpx.HTTPError:
            message = ""
    message = " ".join(message.split())[:300]
    return f"{response.status_code} {response.reason_phrase}" + (f": {message}" if message else "")


class ServerClient:
    """One server: its base URL (``http://host:port/v1``), model name and optional API key."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ServerError(f"the server URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.root = _root(self.base_url)
        self.requested_model = model
        key = api_key if api_key is not None else api_key_for(self.base_url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )
        self.info: ServerInfo | None = None

    def close(self) -> None:
        self._http.close()

    # -- plain requests ---------------------------------------------------------------

    @contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """Turn transport errors into one line naming the URL."""
        try:
            yield
        except httpx.ConnectError as error:
            raise ServerError(_connect_failure(self.base_url, error)) from error
        except httpx.TimeoutException as error:
            raise ServerError(f"{self.base_url} did not answer in time ({what})") from error
        except httpx.HTTPError as error:
            raise ServerError(f"{what} at {self.base_url} failed: {error}") from error
        except httpx.InvalidURL as error:
            raise ServerError(f"not a usable server URL: {self.base_url} ({error})") from error

    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> Any:
        with self._failures(what):
            response = self._http.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise ServerError(f"{what}: the server answered {_error_text(response)}")
        try:
            return response.json()
        except ValueError as error:
            raise ServerError(f"{what}: the answer from {url} is not JSON") from error

    def models(self) -> list[str]:
        data = self._request("GET", f"{self.base_url}/models", "listing models")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ServerError(f"{self.base_url} is not an OpenAI-compatible API (no model list)")
        return [str(entry.get("id")) for entry in entries if isinstance(entry, dict)]

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
            settings = props.get("default_generation_settings") or {}
            info.n_ctx = int(settings.get("n_ctx") or 0)
            info.total_slots = int(props.get("total_slots") or 1)
            info.build = str(props.get("build_info") or "")
            info.slot_save = self._slot_actions_work()
        self.info = info
        return info

    def _props(self) -> dict[str, Any] | None:
        try:
            response = self._http.get(f"{self.root}/props")
            props = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if isinstance(props, dict) and "default_generation_settings" in props:
            return props
        return None

    def _slot_actions_work(self) -> bool:
        """llama-server answers 501 to slot actions unless it runs with --slot-save-path.

        The probe is an unknown action: refused as invalid (400) when slot actions work,
        and it touches no slot.
        """
        try:
            response = self._http.post(
                f"{self.root}/slots/0", params={"action": "kvchat-probe"}, json={}
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 400

    def tokenize(self, text: str) -> int | None:
        """Tokens in ``text`` as the server counts them (None if it cannot say)."""
        try:
            response = self._http.post(f"{self.root}/tokenize", json={"content": text})
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

    def slot_action(self, slot: int, action: str, filename: str) -> dict[str, Any]:
        """llama-server ``/slots/{id}?action=save|restore|erase`` (a file name on the server)."""
        data = self._request(
            "POST",
            f"{self.root}/slots/{slot}",
            f"slot {action}",
            params={"action": action},
            json={"filename": filename},
        )
        return data if isinstance(data, dict) else {}

    # -- chat completions ---------------------------------------------------------------

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

        A dropped stream raises :class:`StreamDropped` carrying the partial completion.
        """
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
        result = ChatCompletion()
        sent = time.perf_counter()
        first = last = 0.0
        finished = False
        url = f"{self.base_url}/chat/completions"
        with self._failures("chat completion"), self._http.stream("POST", url, json=body) as r:
            if r.status_code >= 400:
                raise ServerError(f"chat completion: the server answered {_error_text(r)}")
            try:
                for line in r.iter_lines():
                    if cancel is not None and cancel.is_set():
                        result.cancelled = True
                        break  # closing the stream tells the server to stop
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        finished = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        error = chunk["error"]
                        message = error.get("message") if isinstance(error, dict) else error
                        raise StreamDropped(
                            f"the server stopped the reply with an error: {message}", result
                        )
                    if self._read_chunk(chunk, result, on_text):
                        last = time.perf_counter()
                        first = first or last
            except (httpx.HTTPError, ValueError) as error:
                raise StreamDropped(
                    f"the server dropped the reply stream after {result.pieces} pieces "
                    f"({type(error).__name__})",
                    result,
                ) from error
        if not finished and not result.cancelled and not result.finish_reason:
            raise StreamDropped(
                f"the server closed the reply stream after {result.pieces} pieces "
                "without finishing",
                result,
            )
        if first:
            result.ttft_ms = (first - sent) * 1000
            result.decode_ms = (last - first) * 1000
        return result

    @staticmethod
    def _read_chunk(
        chunk: dict[str, Any], result: ChatCompletion, on_text: Callable[[str], None] | None
    ) -> bool:
        """Fold one SSE chunk into ``result``; True if it carried reply text."""
        got_text = False
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                result.text += text
                result.pieces += 1
                got_text = True
                if on_text is not None:
                    on_text(text)
            if choice.get("finish_reason"):
                result.finish_reason = str(choice["finish_reason"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            result.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                result.cached_tokens = int(details["cached_tokens"])
        timings = chunk.get("timings")
        if isinstance(timings, dict):
            result.timings = {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}
        return got_text
