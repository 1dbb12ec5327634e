"""Continue a reply cut at max tokens, and edit a reply: both engines, real model, real SQLite.

Continue extends the same stored message from the cache (the reply's cells are reused,
as the turn left them or as the saved state restores them); an edited reply is a new
version of it (the old one is kept) whose common prefix stays in the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_server import LlamaServer, serve_default_model

from app.domain import FinishReason, Role
from app.remote.session import RemoteChatSession
from app.session.chat_session import (
    ChatSession,
    ContextOverflowError,
    GenerationOptions,
    SessionError,
)
from app.storage.store import Store

QUESTION = "Tell me about the sea."


def greedy(max_tokens: int) -> GenerationOptions:
    return GenerationOptions(max_tokens=max_tokens, temperature=0.0, seed=0)


def test_continue_extends_the_cut_reply_from_the_cache(engine: ChatSession, store: Store) -> None:
    whole_chat = store.create_chat("whole")
    whole = engine.send(whole_chat.id, QUESTION, greedy(24))
    engine.after_reply(whole_chat.id)
    chat = store.create_chat("cut")
    cut = engine.send(chat.id, QUESTION, greedy(8))
    assert cut.metrics.finish_reason == FinishReason.LENGTH
    engine.after_reply(chat.id)  # commit, warm-up, save: what the window does when idle

    more = engine.continue_reply(chat.id, greedy(16))

    # Only the last token of the open reply is evaluated again (for its logits).
    assert more.metrics.prefill_tokens == 1
    assert more.metrics.reused_tokens > 8
    assert more.metrics.continued_from_tokens == 8
    assert more.reply_message_id == cut.reply_message_id
    messages = store.messages(chat.id)
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT]
    # Greedy 8 + 16 tokens are the greedy 24-token reply, text and token ids alike.
    assert messages[-1].text == whole.reply == cut.reply + more.reply
    assert messages[-1].token_ids == store.message(whole.reply_message_id).token_ids
    reasons = [row.data["finish_reason"] for row in store.metrics(chat.id)]
    assert reasons == [FinishReason.LENGTH, FinishReason.LENGTH]
    assert {row.message_id for row in store.metrics(chat.id)} == {cut.reply_message_id}


def test_continue_after_a_restart_restores_the_reply_from_the_saved_state(
    store: Store, make_engine
) -> None:
    first = make_engine(store)
    chat = store.create_chat("cut")
    first.send(chat.id, QUESTION, greedy(8))
    first.after_reply(chat.id)
    first.close()

    again = make_engine(store)
    more = again.continue_reply(chat.id, greedy(8))

    assert more.metrics.state_load_ms is not None
    assert more.metrics.prefill_tokens == 1
    assert store.messages(chat.id)[-1].text.endswith(more.reply)


def test_continue_refuses_a_chat_whose_last_message_is_not_a_reply(
    engine: ChatSession, store: Store
) -> None:
    chat = store.create_chat("empty")
    with pytest.raises(SessionError, match="no reply to continue"):
        engine.continue_reply(chat.id, greedy(4))
    store.add_message(chat.id, Role.USER, "hello")
    with pytest.raises(SessionError, match="no reply to continue"):
        engine.continue_reply(chat.id, greedy(4))
    assert len(store.messages(chat.id)) == 1


def test_an_edited_reply_is_a_new_version_and_keeps_the_common_prefix(
    engine: ChatSession, store: Store
) -> None:
    chat = store.create_chat("edit")
    cut = engine.send(chat.id, QUESTION, greedy(8))
    engine.after_reply(chat.id)
    cached = len(engine.cache_tokens)
    seq = store.message(cut.reply_message_id).seq
    edited_text = cut.reply.split(" is ")[0] + " is cold and deep, and"

    branch, upkeep = engine.edit_reply(chat.id, seq, edited_text)
    commit = upkeep.advance()

    edited_segment = engine.builder.assistant_segment_from_text(edited_text)
    assert commit is not None and commit.completed
    assert 0 < commit.tokens <= len(edited_segment)  # the prefix before it stayed
    assert commit.tokens < cached
    assert store.messages(chat.id)[-1].text == cut.reply  # the old version is kept
    assert store.messages(branch.id)[-1].text == edited_text
    assert store.messages(branch.id)[-1].token_ids == list(edited_segment)
    assert store.branches(branch.id)[seq] == [chat.id, branch.id]
    upkeep.run()
    more = engine.continue_reply(branch.id, greedy(6))
    assert more.metrics.prefill_tokens == 1
    assert store.messages(branch.id)[-1].text == edited_text + more.reply


@pytest.mark.parametrize(
    "text",
    [
        "Emoji 🐉 and RTL שלום and combining e\u0301 and a lone surrogate \ud800 end",
        "  leading and trailing spaces  ",
    ],
)
def test_an_edited_reply_with_odd_unicode_is_stored_exactly_and_continues(
    engine: ChatSession, store: Store, text: str
) -> None:
    chat = store.create_chat("odd")
    cut = engine.send(chat.id, QUESTION, greedy(4))
    branch, upkeep = engine.edit_reply(chat.id, store.message(cut.reply_message_id).seq, text)
    upkeep.run()
    assert store.messages(branch.id)[-1].text == text
    more = engine.continue_reply(branch.id, greedy(3))
    assert store.messages(branch.id)[-1].text == text + more.reply


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_editing_a_reply_to_empty_text_is_refused_and_writes_nothing(
    engine: ChatSession, store: Store, text: str
) -> None:
    chat = store.create_chat("empty edit")
    cut = engine.send(chat.id, QUESTION, greedy(4))
    with pytest.raises(SessionError, match="cannot be empty"):
        engine.edit_reply(chat.id, store.message(cut.reply_message_id).seq, text)
    assert len(store.family(chat.id)) == 1
    assert store.messages(chat.id)[-1].text == cut.reply


def test_a_huge_edited_reply_is_refused_in_one_line_and_writes_nothing(
    engine: ChatSession, store: Store
) -> None:
    chat = store.create_chat("huge edit")
    cut = engine.send(chat.id, QUESTION, greedy(4))
    huge = "word " * 50_000  # far beyond the 2048-token test context
    with pytest.raises(ContextOverflowError) as raised:
        engine.edit_reply(chat.id, store.message(cut.reply_message_id).seq, huge)
    assert "\n" not in str(raised.value)
    assert len(store.family(chat.id)) == 1


def test_extend_reply_refuses_text_that_does_not_continue_the_reply(store: Store) -> None:
    chat = store.create_chat("store")
    store.add_message(chat.id, Role.USER, "hi")
    reply = store.add_message(chat.id, Role.ASSISTANT, "Hello")
    with pytest.raises(ValueError, match="must begin with"):
        store.extend_reply(
            reply.id, "Goodbye", token_ids=None, token_format=None, status="complete"
        )
    assert store.message(reply.id).text == "Hello"


# -- the server engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    yield from serve_default_model(tmp_path_factory.mktemp("llama-server"))


def test_continue_on_a_server_extends_the_same_reply_from_its_slot(
    server: LlamaServer, tmp_path: Path
) -> None:
    with Store(tmp_path / "chats.db") as store:
        remote = RemoteChatSession(store, server.base_url)
        try:
            chat = store.create_chat("server")
            cut = remote.send(chat.id, QUESTION, greedy(8))
            assert cut.metrics.finish_reason == FinishReason.LENGTH
            remote.after_reply(chat.id)
            more = remote.continue_reply(chat.id, greedy(8))
        finally:
            remote.close()
        messages = store.messages(chat.id)
    assert more.reply_message_id == cut.reply_message_id
    assert more.reply and messages[-1].text == cut.reply + more.reply
    assert len(messages) == 2
    # The slot held the history and the reply: the server reused it.
    assert more.metrics.reused_tokens > 0
    assert more.metrics.prefill_tokens < more.metrics.reused_tokens


# -- the command line -------------------------------------------------------------------


def test_cli_chat_continue_extends_the_last_reply_and_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    db = str(tmp_path / "chats.db")
    first = ["chat", "--db", db, "--chat", "sea", "--temperature", "0", "--json"]
    assert main([*first, "--max-tokens", "6", QUESTION]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["metrics"]["finish_reason"] == FinishReason.LENGTH

    assert main([*first, "--max-tokens", "8", "--continue"]) == 0
    more = json.loads(capsys.readouterr().out)
    assert more["metrics"]["prefill_tokens"] == 1
    assert more["metrics"]["continued_from_tokens"] == 6
    with Store(tmp_path / "chats.db") as store:
        chat = store.chat_by_name("sea")
        assert chat is not None
        texts = [m.text for m in store.messages(chat.id)]
    assert texts == [QUESTION, cut["reply"] + more["reply"]]

    for argv, error in (
        ([*first, "--continue", "a message"], "--continue takes no message"),
        (["chat", "--db", db, "--chat", "other", "--continue"], "no chat named 'other'"),
        (["chat", "--db", str(tmp_path / "new.db"), "--chat", "x", "--continue"], "does not"),
    ):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert error in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "new.db").exists()
