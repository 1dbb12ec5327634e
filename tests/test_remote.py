"""The server engine against a real llama-server (the embedded model), and its failures.

Cache figures are the server's own (``timings.cache_n``/``prompt_n``,
``usage.prompt_tokens_details.cached_tokens``). Only the error paths that a healthy
llama-server cannot produce (a 500, a stream cut mid-reply) use a tiny local HTTP
server; it stands in for no cache logic.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from llama_server import LlamaServer, free_port, llama_server_binary, serve_default_model

from app.bench.config import HISTORY_FIRST_WARM, NAIVE, REOPEN, BenchConfig
from app.bench.strategies import run_benchmark
from app.core.models import default_model_path
from app.domain import FinishReason, Layout, MessageStatus, Role
from app.remote.client import ServerError
from app.remote.session import RemoteChatSession
from app.session.chat_session import IDLE_STEPS, GenerationOptions
from app.storage.store import Store

GREEDY = GenerationOptions(max_tokens=12, temperature=0.0, seed=0)
#: Chat markup around a new message as the server's template writes it (SmolLM2's
#: ChatML: "<|im_start|>user\n" … "<|im_end|>\n<|im_start|>assistant\n"), plus the
#: token the cached prompt and the new one may share before they part.
MARKUP = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    yield from serve_default_model(tmp_path_factory.mktemp("llama-server"))


@pytest.fixture
def remote(server: LlamaServer, store: Store) -> Iterator[RemoteChatSession]:
    session = RemoteChatSession(store, server.base_url)
    yield session
    session.close()


def _chat(store: Store, name: str, layout: str, block: str) -> int:
    chat = store.create_chat(name, layout)
    store.add_instruction_version(chat.id, block, {})
    return chat.id


def _turn(session: RemoteChatSession, chat_id: int, text: str, *, idle: bool = True):
    turn = session.start_turn(chat_id, text, GREEDY, idle_steps=IDLE_STEPS if idle else ())
    result = turn.respond()
    if idle:
        assert turn.run()
    return result


def _edited_third_turn(session: RemoteChatSession, store: Store, layout: str):
    chat_id = _chat(store, layout, layout, "Be brief.")
    _turn(session, chat_id, "Name a fruit.")
    _turn(session, chat_id, "Name a colour.")
    store.add_instruction_version(chat_id, "Answer like a pirate, in one short sentence.", {})
    return session.start_turn(chat_id, "Name a city.", GREEDY).respond().metrics


def test_history_first_edit_recomputes_only_block_and_message_on_the_server(
    remote: RemoteChatSession, store: Store
) -> None:
    history_first = _edited_third_turn(remote, store, Layout.HISTORY_FIRST)
    system_first = _edited_third_turn(remote, store, Layout.SYSTEM_FIRST)
    assert history_first.engine == "server"
    new_part = history_first.block_tokens + history_first.message_tokens
    assert history_first.block_tokens > 5 and history_first.message_tokens > 2
    assert new_part <= history_first.prefill_tokens <= new_part + 2 * MARKUP
    assert history_first.reused_tokens == history_first.prompt_tokens - history_first.prefill_tokens
    assert history_first.reused_tokens > 60  # two turns of history stayed on the server
    # system-first: the edited block opens the prompt, so the server recomputes it all.
    assert system_first.reused_tokens <= MARKUP
    assert system_first.prefill_tokens >= system_first.prompt_tokens - MARKUP
    stored = [row.data for row in store.metrics(store.chat_by_name("history-first").id)]
    assert {row["engine"] for row in stored} == {"server"}
    assert stored[-1]["reused_tokens"] == history_first.reused_tokens


def test_warm_up_request_keeps_the_next_turn_down_to_the_new_message(
    remote: RemoteChatSession, store: Store
) -> None:
    warm_chat = _chat(store, "warm", Layout.HISTORY_FIRST, "Be brief and friendly.")
    cold_chat = _chat(store, "cold", Layout.HISTORY_FIRST, "Be brief and friendly.")
    _turn(remote, warm_chat, "Name a fruit.")
    warm = _turn(remote, warm_chat, "Name a colour.").metrics
    _turn(remote, cold_chat, "Name a fruit.", idle=False)
    cold = _turn(remote, cold_chat, "Name a colour.", idle=False).metrics
    assert warm.warmup_tokens > 0
    assert warm.message_tokens <= warm.prefill_tokens <= warm.message_tokens + MARKUP
    # Without the warm-up the block sat before the last message and reply: recomputed.
    assert cold.prefill_tokens >= cold.message_tokens + cold.block_tokens


def test_chat_switch_and_server_restart_restore_the_saved_slot(
    server: LlamaServer, store: Store
) -> None:
    session = RemoteChatSession(store, server.base_url)
    assert session.info.slot_save and session.info.total_slots == 1
    first = _chat(store, "first", Layout.HISTORY_FIRST, "Be brief.")
    second = _chat(store, "second", Layout.HISTORY_FIRST, "Be brief.")
    _turn(session, first, "Name a fruit.")
    _turn(session, second, "Name a planet.")  # the one slot now holds the second chat
    back = _turn(session, first, "Name a colour.").metrics
    assert back.state_load_ms is not None
    assert back.prefill_tokens <= back.message_tokens + MARKUP
    session.close()

    server.restart()
    reopened = RemoteChatSession(store, server.base_url)
    try:
        after = _turn(reopened, first, "Name a city.").metrics
    finally:
        reopened.close()
    assert after.state_load_ms is not None
    assert after.reused_tokens > back.prompt_tokens
    assert after.prefill_tokens <= after.message_tokens + MARKUP


def test_cli_chat_prints_the_servers_figures(server: LlamaServer, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "app", "chat", "--server", server.base_url, "--json",
        "--temperature", "0", "--max-tokens", "12", "--db", str(tmp_path / "cli.db"),
        "--chat", "demo",
    ]  # fmt: skip
    first = subprocess.run(
        [*command, "--instructions", "Be brief.", "Hello"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [*command, "And then?"], capture_output=True, text=True, timeout=300, check=False
    )
    assert second.returncode == 0, second.stderr
    payload = json.loads(second.stdout)
    metrics = payload["metrics"]
    assert metrics["engine"] == "server"
    assert metrics["state_load_ms"] is not None  # the slot file of the first process
    assert metrics["reused_tokens"] > json.loads(first.stdout)["metrics"]["prompt_tokens"]
    assert metrics["prefill_tokens"] == metrics["prompt_tokens"] - metrics["reused_tokens"]
    assert payload["reply"]


def test_bench_plays_the_strategies_on_the_server(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    slots.mkdir()
    three = LlamaServer(
        llama_server_binary(), default_model_path(), slots, tmp_path / "log", parallel=3
    )
    three.start()
    try:
        config = BenchConfig(
            history_tokens=300, instruction_tokens=80, message_tokens=20, turns=2, max_tokens=4,
            strategies=(NAIVE, HISTORY_FIRST_WARM, REOPEN), server_url=three.base_url,
        )  # fmt: skip
        report = run_benchmark(config)
    finally:
        three.stop()
    assert report.model["kv_type"] == "server" and not report.cancelled
    naive, warm, reopen = (report.summaries[name] for name in (NAIVE, HISTORY_FIRST_WARM, REOPEN))
    assert naive.prompt_tokens is not None and naive.prompt_tokens > 300
    assert naive.prefill_tokens == naive.prompt_tokens  # its slot was erased before each turn
    assert warm.prefill_tokens is not None and warm.prefill_tokens <= 20 + MARKUP
    assert reopen.state_load_ms is not None  # the slot file restored before each turn
    assert reopen.prefill_tokens is not None and reopen.prefill_tokens <= 20 + MARKUP


# -- failures -------------------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo[ServerError]) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


def test_a_server_that_is_down_is_one_line(store: Store, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError) as error:
        RemoteChatSession(store, url)
    assert _one_line(error) == f"Connection refused: is the server running at {url}?"
    done = subprocess.run(
        [sys.executable, "-m", "app", "chat", "--db", str(tmp_path / "cli.db"), "--chat", "x",
         "--server", url, "Hello"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("kvchat: error: Connection refused: is the server running")
    assert "Errno" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_wrong_url_and_an_unknown_model_are_one_line(server: LlamaServer, store: Store) -> None:
    with pytest.raises(ServerError) as error:
        RemoteChatSession(store, f"{server.root}/not-an-api/v1")
    assert "404" in _one_line(error)
    with pytest.raises(ServerError) as error:
        RemoteChatSession(store, server.base_url, "no-such-model")
    assert "no model named 'no-such-model'" in _one_line(error)
    with pytest.raises(ServerError) as error:
        RemoteChatSession(store, "127.0.0.1:8080/v1")
    assert "http://" in _one_line(error)


def test_a_4xx_answer_keeps_the_message(remote: RemoteChatSession, store: Store) -> None:
    chat_id = store.create_chat("long", Layout.HISTORY_FIRST).id
    too_long = "word " * 3000  # more tokens than the server's context
    with pytest.raises(ServerError) as error:
        remote.send(chat_id, too_long, GREEDY)
    assert "400" in _one_line(error)
    messages = store.messages(chat_id)
    assert [(m.role, m.text) for m in messages] == [(Role.USER, too_long)]


class _Misbehaving(BaseHTTPRequestHandler):
    """Lists one model; answers chat completions with a 500 or cuts the stream."""

    protocol_version = "HTTP/1.1"
    mode = "500"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "small"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
        elif self.mode == "500":
            self._json(500, {"error": {"message": "CUDA out of memory"}})
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in ("Hello", " there"):
                event = f'data: {{"choices":[{{"index":0,"delta":{{"content":"{piece}"}}}}]}}\n\n'
                data = event.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            self.close_connection = True  # no last chunk, no [DONE]: the stream is cut


@pytest.fixture
def misbehaving() -> Iterator[type[_Misbehaving]]:
    handler = type("Handler", (_Misbehaving,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # type: ignore[attr-defined]
    yield handler
    httpd.shutdown()
    httpd.server_close()


def test_a_5xx_answer_is_one_line_and_keeps_the_message(
    misbehaving: type[_Misbehaving], store: Store
) -> None:
    session = RemoteChatSession(store, misbehaving.url)  # type: ignore[attr-defined]
    chat_id = store.create_chat("five hundred").id
    with pytest.raises(ServerError) as error:
        session.send(chat_id, "Hello?", GREEDY)
    session.close()
    assert "500 Internal Server Error: CUDA out of memory" in _one_line(error)
    assert [m.text for m in store.messages(chat_id)] == ["Hello?"]


def test_a_stream_dropped_mid_reply_stores_the_partial_reply_as_cancelled(
    misbehaving: type[_Misbehaving], store: Store
) -> None:
    misbehaving.mode = "drop"
    session = RemoteChatSession(store, misbehaving.url)  # type: ignore[attr-defined]
    chat_id = store.create_chat("dropped").id
    with pytest.raises(ServerError) as error:
        session.send(chat_id, "Hello?", GREEDY)
    session.close()
    assert "the partial reply is stored as cancelled" in _one_line(error)
    user, reply = store.messages(chat_id)
    assert (user.role, user.text) == (Role.USER, "Hello?")
    assert (reply.role, reply.text, reply.status) == (
        Role.ASSISTANT,
        "Hello there",
        MessageStatus.CANCELLED,
    )
    (row,) = store.metrics(chat_id)
    assert row.data["finish_reason"] == FinishReason.CANCELLED
    assert row.data["engine"] == "server"



@pytest.mark.parametrize("mode", ["500", "drop"])
def test_a_failed_regenerate_on_the_server_keeps_the_old_reply(
    misbehaving: type[_Misbehaving], store: Store, mode: str
) -> None:
    """A 500 keeps the reply as it was; a stream cut mid-reply stores its partial text as a
    new version of the reply, beside the old one (Regenerate never deletes a reply)."""
    misbehaving.mode = mode
    chat_id = store.create_chat(f"regenerate {mode}").id
    store.add_message(chat_id, Role.USER, "Hello?")
    old = store.add_message(chat_id, Role.ASSISTANT, "Hi! How can I help?")
    session = RemoteChatSession(store, misbehaving.url)  # type: ignore[attr-defined]
    with pytest.raises(ServerError):
        session.regenerate(chat_id, GREEDY)
    session.close()
    assert [(m.role, m.text) for m in store.messages(chat_id)] == [
        (Role.USER, "Hello?"), (Role.ASSISTANT, old.text),
    ]
    family = store.family(chat_id)
    if mode == "500":
        assert len(family) == 1, "no empty version"
        return
    [version] = [chat for chat in family if chat.id != chat_id]
    assert [(m.text, m.status) for m in store.messages(version.id)][-1] == (
        "Hello there", MessageStatus.CANCELLED,
    )
    assert store.branches(chat_id) == {1: [chat_id, version.id]}


# -- the window ---------------------------------------------------------------------------


@pytest.mark.gui
def test_window_connects_to_the_server_and_back_keeping_the_chat(
    qtbot, server: LlamaServer, db_path: Path, tmp_path: Path
) -> None:
    from gui_helpers import close_window, open_window, send_turn, temp_settings

    window = open_window(qtbot, db_path, temp_settings(tmp_path))
    try:
        dialog = window.ask_server()
        dialog.url_edit.setText(server.base_url)
        dialog.test_button.click()
        qtbot.waitUntil(lambda: dialog.test_button.isEnabled(), timeout=30_000)
        assert dialog.result_label.text().startswith("Connected. llama-server: SmolLM2")
        assert "slot save/restore" in dialog.result_label.text()
        with qtbot.waitSignal(window.model_ready, timeout=30_000):
            dialog.accept()
        assert window.model_status_label.text().startswith(f"Connected to {server.base_url}")
        assert window.model_combo.currentText().endswith("(server)"), "not “(embedded)”"
        assert "embedded" not in window.model_combo.currentText()
        on_server, background = send_turn(qtbot, window, "Name a fruit.")
        assert on_server.reply and background is not None and background.completed

        with qtbot.waitSignal(window.model_ready, timeout=120_000):
            window.load_model(None)  # back to the embedded model
        assert not window.model_status_label.text().startswith("Connected")
        local, _ = send_turn(qtbot, window, "Name a colour.")
        chat_id = window.current_chat_id
        texts = [m.text for m in window.store.messages(chat_id)]
        assert texts == ["Name a fruit.", on_server.reply, "Name a colour.", local.reply]
        engines = [row.data["engine"] for row in window.store.metrics(chat_id)]
        assert engines == ["server", "local"]
    finally:
        close_window(window)


def test_a_draft_prefilled_on_the_server_leaves_the_send_one_token(
    remote: RemoteChatSession, store: Store
) -> None:
    chat_id = _chat(store, "live", Layout.HISTORY_FIRST, "Be brief.")
    _turn(remote, chat_id, "Name a fruit.")
    message = "Name a large city in the south of Spain."
    off = remote.prefill_draft(chat_id, message)
    assert off.skipped is not None and off.evaluated == 0  # off by default for servers
    remote.live_prefill = True
    draft = remote.prefill_draft(chat_id, message)  # a request that generates nothing
    assert draft.completed and draft.evaluated > 0
    metrics = _turn(remote, chat_id, message).metrics
    assert metrics.message_tokens > 5
    assert metrics.prefill_tokens == 1  # the server re-evaluates the last token only


# -- a chat template that refuses a late system message ----------------------------------

#: Gemma 2's chat template as published: no system role, and roles must alternate.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
#: The tests' llama-server build, word for word: its answer to user, assistant, system,
#: user under that template, and to a prompt longer than its context.
LATE_SYSTEM_REFUSED = (
    b'{"error":{"code":400,"message":"Unable to generate parser for this template. Automatic'
    b" parser generation failed: \\n------------\\nWhile executing CallExpression at line 1,"
    b" column 226 in source:\\n...op.index0 % 2 == 0) %}{{ raise_exception('Conversation"
    b" roles must alternate user...\\n                                           ^\\nError:"
    b" Jinja Exception: Conversation roles must alternate user/assistant/user/assistant/...\","
    b'"type":"invalid_request_error"}}'
)
CONTEXT_EXCEEDED = (
    b'{"error":{"code":400,"message":"request (609 tokens) exceeds the available context size'
    b' (256 tokens), try increasing it","type":"exceed_context_size_error",'
    b'"n_prompt_tokens":609,"n_ctx":256}}'
)


def test_a_template_refusal_is_read_from_the_servers_error_json_alone() -> None:
    from app.remote import schema

    refused = schema.decode(LATE_SYSTEM_REFUSED, schema.ErrorAnswer).text()
    assert refused.endswith("Conversation roles must alternate user/assistant/user/assistant/...")
    assert schema.refuses_roles(refused)
    too_long = schema.decode(CONTEXT_EXCEEDED, schema.ErrorAnswer).text()
    assert too_long.startswith("request (609 tokens) exceeds")
    assert not schema.refuses_roles(too_long)


def test_a_template_that_refuses_a_late_system_message_gets_the_block_as_a_user_turn(
    tmp_path: Path, store: Store
) -> None:
    from app.remote.client import ServerClient, ServerRefused

    template = tmp_path / "gemma-2.jinja"
    template.write_text(GEMMA2_TEMPLATE)
    (tmp_path / "slots").mkdir()
    server = LlamaServer(
        llama_server_binary(), default_model_path(), tmp_path / "slots", tmp_path / "server.log",
        extra=("--chat-template-file", str(template)),
    )  # fmt: skip
    server.start()
    try:
        client = ServerClient(server.base_url)
        roles = ("user", "assistant", "system", "user")
        late = [{"role": role, "content": "Hi"} for role in roles]
        with pytest.raises(ServerRefused) as raised:
            client.chat(late, max_tokens=4)
        client.close()
        assert raised.value.status == 400 and raised.value.refused_roles
        session = RemoteChatSession(store, server.base_url)
        try:
            chat_id = _chat(store, "gemma 2", Layout.HISTORY_FIRST, "Be brief.")
            _turn(session, chat_id, "Name a fruit.", idle=False)
            second = _turn(session, chat_id, "Name a colour.", idle=False)
            assert session.block_role == "user+ack"  # system, then user, were refused
        finally:
            session.close()
    finally:
        server.stop()
    assert second.reply
    assert [m.role for m in store.messages(chat_id)] == ["user", "assistant"] * 2


def test_alternatives_on_a_server_are_requests_with_the_prompt_cached(
    remote: RemoteChatSession, store: Store
) -> None:
    chat = store.create_chat("alternatives", "history-first")
    options = GenerationOptions(max_tokens=8, temperature=0.9, seed=5, alternatives=3)
    result = remote.send(chat.id, "Name a fruit.", options)
    assert len(result.alternatives) == 3 and result.metrics.alternatives == 3
    versions = store.branches(chat.id)[store.messages(chat.id)[-1].seq]
    assert versions == [a.chat_id for a in result.alternatives]
    assert store.messages(chat.id)[-1].text == result.reply == result.alternatives[0].text
    note = next(n for n in result.metrics.notes if "one after another" in n)
    found = re.search(r"found (\d+) of the prompt's (\d+) tokens cached", note)
    assert found is not None, note
    cached, prompt = int(found[1]), int(found[2])
    assert prompt == result.metrics.prompt_tokens > 0
    assert cached >= prompt - 1  # the server evaluates the last prompt token again at most
