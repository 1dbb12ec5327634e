"""Documents on the real model and real files: a document in the chat's fixed region, its
pages reused by another chat through the chain hash (and refused when forged), questions
that each start from the documents, and files that cannot be attached."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import GREEDY, flip_page_byte

from app.cli import main
from app.core.documents import MAX_FILE_BYTES, DocumentError, read_document
from app.core.state_pages import PAGE_TOKENS
from app.domain import Role, SegmentKind
from app.session.chat_session import ChatSession
from app.session.engine import ContextOverflowError
from app.storage.store import Store

FACT = "The ferry to the north island leaves at 7:45 every morning from pier 9."
QUESTION = "When does the ferry to the north island leave?"
_WORDS = [
    "river", "city", "bridge", "council", "budget", "harbor", "ferry", "station", "library",
    "museum", "park", "school", "tower", "market", "garden", "street", "square", "festival",
]  # fmt: skip


def document_file(folder: Path, sentences: int, name: str = "town.txt") -> Path:
    """A real text file: numbered sentences with one fact in the middle."""
    lines = [
        f"Note {i}: the {_WORDS[i % len(_WORDS)]} is near the {_WORDS[(i * 7) % len(_WORDS)]}"
        f" and the {_WORDS[(i * 3 + 1) % len(_WORDS)]}."
        for i in range(sentences)
    ]
    lines.insert(sentences // 2, FACT)
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def chat_with_document(store: Store, name: str, path: Path, *, no_history: bool = False) -> int:
    chat = store.create_chat(name)
    document = read_document(path)
    store.attach_document(chat.id, document.name, document.text)
    if no_history:
        store.update_chat(chat.id, no_history=1)
    return chat.id


def test_a_second_chat_with_the_same_document_restores_its_pages(
    store: Store, engine: ChatSession, tmp_path: Path
) -> None:
    path = document_file(tmp_path, 40)
    first = chat_with_document(store, "first", path)
    plan = engine.prompt_plan(first, QUESTION)
    kinds = [segment.kind for segment in plan.segments]
    assert kinds[:2] == [SegmentKind.PREAMBLE, SegmentKind.DOCUMENT]  # before the history
    cold = engine.send(first, QUESTION, GREEDY)
    engine.after_reply(first)
    assert cold.metrics.document_eval_tokens >= plan.count(SegmentKind.DOCUMENT)
    one_chat = store.kv.total_bytes()

    engine.forget_chat(first)  # as after a restart: only the pages on disk can help
    second = chat_with_document(store, "second", path)
    warm = engine.send(second, QUESTION, GREEDY)
    assert warm.reply == cold.reply  # greedy oracle: reused pages give the cold reply
    assert warm.metrics.prefill_tokens <= 100
    fixed = plan.count(SegmentKind.PREAMBLE, SegmentKind.DOCUMENT)
    assert warm.metrics.reused_tokens >= fixed // PAGE_TOKENS * PAGE_TOKENS
    assert any("saved by 'first'" in note for note in warm.metrics.notes)
    engine.after_reply(second)

    engine.forget_chat(second)
    third = chat_with_document(store, "third", path)
    other = engine.send(third, "Where does the ferry leave from?", GREEDY)
    engine.after_reply(third)
    assert other.metrics.prefill_tokens <= 100
    assert store.kv.total_bytes() <= 1.3 * one_chat


def test_a_forged_page_is_not_reused_by_another_chat(
    store: Store, engine: ChatSession, tmp_path: Path
) -> None:
    path = document_file(tmp_path, 40)
    first = chat_with_document(store, "first", path)
    cold = engine.send(first, QUESTION, GREEDY)
    engine.after_reply(first)
    flip_page_byte(store, first, 3)  # the fourth page of the document: its MAC fails
    forged = store.kv.state(first).page_hashes[3]

    engine.forget_chat(first)
    second = chat_with_document(store, "second", path)
    warm = engine.send(second, QUESTION, GREEDY)
    assert warm.metrics.reused_tokens == 3 * PAGE_TOKENS  # the run stops before the forgery
    assert warm.metrics.prefill_tokens == warm.metrics.prompt_tokens - 3 * PAGE_TOKENS
    assert warm.reply == cold.reply
    assert forged not in store.kv.known_pages([forged])  # dropped: the next save rewrites it


def test_each_question_starts_from_the_documents(
    store: Store, engine: ChatSession, tmp_path: Path
) -> None:
    chat_id = chat_with_document(store, "questions", document_file(tmp_path, 12), no_history=True)
    store.add_instruction_version(chat_id, "Answer in one short sentence.", {})
    results = []
    for _ in range(3):
        turn = engine.start_turn(chat_id, QUESTION, GREEDY)
        results.append(turn.respond())
        turn.run()
    prompts = {r.metrics.prompt_tokens for r in results}
    assert len(prompts) == 1  # flat: no earlier question or reply joins the prompt
    assert {r.reply for r in results} == {results[0].reply}
    assert all(r.metrics.commit_tokens == 0 for r in results)
    question = len(engine.builder.user_segment(QUESTION)) + len(engine.builder.generation_prompt())
    assert all(r.metrics.prefill_tokens <= question for r in results[1:])
    roles = [m.role for m in store.messages(chat_id)]
    assert roles == [Role.USER, Role.ASSISTANT] * 3  # every reply is kept for reading
    warm = engine.history_plan(chat_id, with_block=True)
    assert [s.kind for s in warm.segments] == [
        SegmentKind.PREAMBLE, SegmentKind.DOCUMENT, SegmentKind.BLOCK,
    ]  # fmt: skip
    assert list(engine.cache_tokens) == warm.tokens  # the warm state: documents + block
    assert store.kv.saved_token_ids(chat_id) == warm.tokens
    assert any("2 earlier messages are not in the prompt" in n for n in results[1].metrics.notes)


def test_documents_that_do_not_fit_are_refused_and_nothing_is_stored(
    store: Store, engine: ChatSession, tmp_path: Path
) -> None:
    chat_id = chat_with_document(store, "big", document_file(tmp_path, 400))
    with pytest.raises(ContextOverflowError, match="attached documents"):
        engine.send(chat_id, QUESTION, GREEDY)
    assert store.messages(chat_id) == []


def test_a_fork_keeps_the_documents(store: Store, tmp_path: Path) -> None:
    chat_id = chat_with_document(store, "source", document_file(tmp_path, 3), no_history=True)
    store.add_message(chat_id, Role.USER, "hello")
    fork = store.fork_chat(chat_id, 0, "fork")
    assert [(d.name, d.text) for d in store.documents(fork.id)] == [
        (d.name, d.text) for d in store.documents(chat_id)
    ]
    assert fork.no_history == 1
    store.detach_document(store.documents(chat_id)[0].id)
    assert store.documents(chat_id) == [] and len(store.documents(fork.id)) == 1


# -- files that cannot be attached: one line each, bounded -------------------------------


def test_a_pdf_is_read_by_its_text_layer(tmp_path: Path) -> None:
    path = tmp_path / "ferry.pdf"
    path.write_bytes(_pdf_with_text(["The ferry leaves at 7:45.", "Pier 9."]))
    assert read_document(path).text == "The ferry leaves at 7:45.\nPier 9."


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00" * 100, "binary data"),
        ("caf\u00e9".encode("latin-1"), "not UTF-8"),
        (b"%PDF-1.4\n1 0 obj garbage", "not a readable PDF"),
        (b"   \n\n  ", "holds no text"),
    ],
)
def test_files_that_are_not_text_are_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "file.txt"
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=reason) as caught:
        read_document(path)
    assert "\n" not in str(caught.value)


def test_a_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    with path.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES * 50)  # 1 GB, sparse: nothing to read
    started = time.perf_counter()
    with pytest.raises(DocumentError, match="MB; documents up to"):
        read_document(path)
    assert time.perf_counter() - started < 5


def test_chat_with_a_missing_document_fails_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "chats.db"
    code = main(["chat", "--db", str(db), "--chat", "c", "--document",
                 str(tmp_path / "missing.txt"), "hello"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "cannot read" in err and "missing.txt" in err
    assert list(tmp_path.iterdir()) == []


def _pdf_with_text(lines: list[str]) -> bytes:
    """A minimal one-page PDF whose text layer holds ``lines`` (one per line)."""
    content = "BT /F1 12 Tf 72 720 Td " + " ".join(f"({t}) Tj 0 -16 Td" for t in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        " /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_documents_with_a_server_are_refused_before_any_file_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = document_file(tmp_path, 3)
    db = tmp_path / "chats.db"
    code = main(["chat", "--db", str(db), "--chat", "c", "--server", "http://127.0.0.1:9/v1",
                 "--document", str(path), "--no-history", "hello"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "--document and --no-history are not available with --server" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
