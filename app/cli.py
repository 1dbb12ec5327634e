"""Headless command line: ``python -m app chat|history|bench|eval``.

Errors are one line on stderr and a non-zero exit code; stdout carries only the
reply (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from app import arguments, limits
from app.arguments import COMMANDS, positive_int, whole_number
from app.core.documents import DocumentText, read_document
from app.core.errors import DecodeError
from app.core.models import ModelFileError
from app.domain import KVType, Layout, MessageStatus, Role, TrimMode
from app.session.engine import (
    ChatEngine,
    ContextOverflowError,
    GenerationOptions,
    SessionError,
    TurnResult,
)
from app.storage.export import export_chat, export_file_name
from app.storage.kv_store import DEFAULT_BUDGET_BYTES
from app.storage.records import Chat, Message
from app.storage.store import StorageError, Store, valid_chat_name

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kvchat: error: {message} (see --help)\n")


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return name.strip(), value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--kv-type", choices=list(KVType), default=KVType.F16, help="KV cache type"
    )
    parser.add_argument(
        "--n-ctx",
        type=arguments.n_ctx,
        help=f"context size in tokens ({limits.MIN_N_CTX} to {limits.MAX_N_CTX}; the model's "
        "chat markup plus a short message and reply must fit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m app", description="KV Chat command line")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    chat = commands.add_parser("chat", help=COMMANDS["chat"])
    _add_chat_options(chat)
    _add_reply_options(chat)
    _add_server_options(chat)
    _add_reading_commands(commands)
    _add_measuring_commands(commands)
    return parser


def _add_chat_options(chat: argparse.ArgumentParser) -> None:
    """Which chat, which model, and how its prompt is laid out."""
    chat.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    chat.add_argument("--chat", required=True, help="chat name (created if missing)")
    _add_model_options(chat)
    chat.add_argument(
        "--chat-template",
        type=arguments.chat_template,
        metavar="NAME|FILE",
        help="chat template for this model, kept for it from now on: a llama.cpp built-in "
        "name (e.g. gemma, llama3, chatml), a Jinja file, or gguf (the GGUF's own again)",
    )
    chat.add_argument("--layout", choices=list(Layout), help="prompt layout for this chat")
    source = chat.add_mutually_exclusive_group()
    source.add_argument("--instructions", help="instruction block text (new version if changed)")
    source.add_argument("--instructions-file", help="read the instruction block from a file")
    chat.add_argument(
        "--var",
        action="append",
        type=_variable,
        default=[],
        metavar="KEY=VALUE",
        help="instruction variable; fills {{KEY}} in the block",
    )
    chat.add_argument(
        "--trim-tokens",
        type=arguments.trim_tokens,
        help=f"limit of cached history tokens (1 to {limits.MAX_TRIM_TOKENS})",
    )
    chat.add_argument(
        "--trim-mode", choices=list(TrimMode), help="how trimmed turns leave the cache"
    )
    chat.add_argument(
        "--document", action="append", default=[], metavar="FILE",
        help="attach a text, Markdown or PDF file to the chat (repeatable; kept for later"
        " turns; the same file again is not attached twice)",
    )  # fmt: skip
    chat.add_argument(
        "--no-history", action="store_true",
        help="each question starts from the documents: replies are kept, not prompted"
        " (kept for the chat)",
    )  # fmt: skip
    chat.add_argument("--json", action="store_true", help="print one JSON object")
    chat.add_argument(
        "message", nargs="?", help="the user's message ('-' reads standard input)"
    )


def _add_reply_options(chat: argparse.ArgumentParser) -> None:
    """How the reply is sampled, how long it may be, and how many are drawn."""
    chat.add_argument(
        "--max-tokens",
        type=arguments.max_tokens,
        default=128,
        help=f"longest reply in tokens (1 to {limits.MAX_TOKENS})",
    )
    chat.add_argument(
        "--seed",
        type=arguments.seed,
        default=0,
        help=f"sampling seed: 0 to {limits.MAX_SEED} repeat a reply; {limits.RANDOM_SEED} "
        "picks a random seed",
    )
    chat.add_argument(
        "--temperature",
        type=arguments.temperature,
        default=0.7,
        help=f"0 (always the most likely token) to {limits.MAX_TEMPERATURE:g}",
    )
    chat.add_argument(
        "--alternatives",
        type=arguments.alternatives,
        default=1,
        metavar="N",
        help=f"sample N replies (1 to {limits.MAX_ALTERNATIVES}) from the one prompt, stored as "
        "versions of the reply; the first is kept",
    )
    chat.add_argument(
        "--continue",
        dest="continue_reply",
        action="store_true",
        help="write more of the chat's last reply (e.g. one cut at --max-tokens), from the "
        "cache; no message",
    )


def _add_server_options(chat: argparse.ArgumentParser) -> None:
    """The same chat on an OpenAI-compatible server instead of the local model."""
    chat.add_argument(
        "--server",
        metavar="URL",
        help="OpenAI-compatible server base URL, e.g. http://127.0.0.1:8080/v1 "
        "(API key from KVCHAT_API_KEY or the OS keyring)",
    )
    chat.add_argument("--server-model", metavar="NAME", help="model name on the server")
    chat.add_argument(
        "--server-timeout",
        metavar="SECONDS",
        type=arguments.server_timeout,
        default=limits.DEFAULT_SERVER_TIMEOUT_S,
        help="abandon a reply after this long without data from the server (keep-alives "
        f"do not count; default {limits.DEFAULT_SERVER_TIMEOUT_S:g})",
    )


def _add_reading_commands(commands: Any) -> None:
    """Commands that read or copy stored chats and never load a model."""
    history = commands.add_parser("history", help=COMMANDS["history"])
    history.add_argument("--db", required=True)
    history.add_argument("--chat", required=True)
    history.add_argument("--json", action="store_true")

    fork = commands.add_parser("fork", help=COMMANDS["fork"])
    fork.add_argument("--db", required=True)
    fork.add_argument("--chat", required=True, help="the chat to fork")
    fork.add_argument("--at", required=True, type=whole_number, metavar="SEQ",
                      help="the last message (seq, as `history` shows) the new chat keeps")
    fork.add_argument("--name", required=True, help="name of the new chat")
    fork.add_argument("--json", action="store_true")

    export = commands.add_parser("export", help=COMMANDS["export"])
    export.add_argument("--db", required=True)
    export.add_argument("--chat", required=True)
    export.add_argument("--out", metavar="FILE",
                        help="*.json writes JSON; any other name writes Markdown (default: "
                        "the chat's name in your documents folder)")
    export.add_argument("--all-versions", action="store_true",
                        help="JSON with every version of the chat (edits, regenerated replies)")

    storage = commands.add_parser("storage", help=COMMANDS["storage"])
    storage.add_argument("--db", required=True)
    storage.add_argument("--set-budget-mb", type=positive_int, metavar="MB",
                         help="keep at most this much KV storage (evicts least recently used)")
    storage.add_argument("--json", action="store_true")


def _add_measuring_commands(commands: Any) -> None:
    """The bench and the answer-quality eval, whose options live with them."""
    from app.bench.cli import add_bench_arguments  # local: keeps start-up light

    bench = commands.add_parser("bench", help=COMMANDS["bench"])
    _add_model_options(bench)
    add_bench_arguments(bench)

    from app.eval.cli import add_eval_arguments

    evaluation = commands.add_parser(
        "eval", help=COMMANDS["eval"]
    )
    _add_model_options(evaluation)
    add_eval_arguments(evaluation)


def _open_store(path: str) -> Store:
    db_path = Path(path).expanduser()
    if db_path.parent and not db_path.parent.exists():
        raise CliError(f"folder does not exist: {db_path.parent}")
    return Store(db_path, exclusive=True)


def _last_unanswered(store: Store, chat_id: int) -> Message | None:
    messages = store.messages(chat_id)
    if messages and messages[-1].status == MessageStatus.UNANSWERED:
        return messages[-1]
    return None


def _answer(
    engine: ChatEngine,
    store: Store,
    chat_id: int,
    message: str,
    options: GenerationOptions,
) -> tuple[TurnResult | None, Message | None, list[str]]:
    """One turn whose outcome is exactly what the command then reports.

    The same text as the chat's last, unanswered message (a turn that failed or was
    killed before its reply was stored) answers that message instead of storing it
    twice. If the reply was stored but a later write failed, the reply is still the
    outcome (with a warning); if it was not stored, the message stays unanswered and
    the error says how to retry.
    """
    warnings: list[str] = []
    pending = _last_unanswered(store, chat_id)
    try:
        if pending is not None and pending.text == message:
            result = engine.regenerate(chat_id, options)
        else:
            result = engine.send(chat_id, message, options)
    except (StorageError, DecodeError, SessionError) as error:
        messages = store.messages(chat_id)
        answered = len(messages) >= 2 and messages[-1].role == Role.ASSISTANT
        if isinstance(error, StorageError) and answered and messages[-2].text == message:
            return None, messages[-1], [f"{error} (the reply was saved; its metrics were not)"]
        reason = f"the model failed: {error}" if isinstance(error, DecodeError) else str(error)
        kept = bool(messages) and messages[-1].role == Role.USER and messages[-1].text == message
        if not kept or isinstance(error, ContextOverflowError):  # the same again cannot help
            raise CliError(reason) from error
        raise CliError(
            f"{reason}; your message is kept as unanswered: run the same command again to "
            "answer it"
        ) from error
    try:
        finished = engine.after_reply(chat_id)
    except (StorageError, SessionError, DecodeError) as error:  # the disk, a server gone away
        warnings.append(f"{error} (the reply was saved; the cache state was not)")
    else:
        if finished is not None:
            result = replace(result, metrics=finished)
    return result, None, warnings


def _check_continue(args: argparse.Namespace) -> None:
    """``chat --continue`` extends a reply that exists: refused before any file is made."""
    if args.message is not None:
        raise CliError("--continue takes no message: it writes more of the last reply")
    if args.alternatives != 1:
        raise CliError("--continue writes more of one reply: --alternatives does not apply")
    if not Path(args.db).expanduser().is_file():
        raise CliError(f"no chat to continue: {args.db} does not exist")


def _continue(
    engine: ChatEngine, chat_id: int, options: GenerationOptions
) -> tuple[TurnResult | None, Message | None, list[str]]:
    """More of the chat's last reply, then the idle steps (as after a turn)."""
    try:
        result = engine.continue_reply(chat_id, options)
    except (StorageError, DecodeError, SessionError) as error:
        raise CliError(str(error)) from error
    warnings: list[str] = []
    try:
        finished = engine.after_reply(chat_id)
    except (StorageError, SessionError, DecodeError) as error:
        warnings.append(f"{error} (the reply was saved; the cache state was not)")
    else:
        if finished is not None:
            result = replace(result, metrics=finished)
    return result, None, warnings


def _check_engine_options(args: argparse.Namespace) -> None:
    """Options that cannot go together, refused before any file is opened."""
    if not args.server:
        if args.server_model:
            raise CliError("--server-model needs --server")
        return
    if args.model or args.n_ctx or args.chat_template:
        raise CliError(
            "--model, --n-ctx and --chat-template are for the local engine; "
            "the server has its model and template"
        )
    if args.trim_tokens is not None or args.trim_mode is not None:
        raise CliError("--trim-tokens and --trim-mode are not available with --server yet")
    if getattr(args, "document", None) or getattr(args, "no_history", False):
        raise CliError("--document and --no-history are not available with --server yet")


def _open_session(args: argparse.Namespace, store: Store) -> ChatEngine:
    """The local engine, or the server's with ``--server`` (the same interface).

    Each engine is imported here, when it is used: llama.cpp is loaded only for a local
    model, httpx only for a server, and neither by the read-only commands.
    """
    _check_engine_options(args)
    if not args.server:
        from app.session.chat_session import ChatSession

        return ChatSession(
            store,
            args.model,
            n_ctx=args.n_ctx,
            kv_type=args.kv_type,
            chat_template=args.chat_template,
        )
    from app.remote.session import RemoteChatSession  # local: httpx only when used

    return RemoteChatSession(
        store, args.server, args.server_model, timeout_s=args.server_timeout
    )


def _companions(path: Path) -> list[Path]:
    """A SQLite file and the files SQLite and the store put beside it."""
    return [path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))]


class _NewFiles:
    """The database files a command creates, removed again if it fails before its first
    write, so a refused option (a context too small, a missing model, an unknown
    template, a server that is down) leaves the folder as it was."""

    def __init__(self, db_path: Path) -> None:
        self.watched = [*_companions(db_path), db_path.with_name(db_path.name + ".lock")]
        self.existed = {path for path in self.watched if path.exists()}

    def watch(self, path: Path) -> None:
        for companion in _companions(path):
            self.watched.append(companion)
            if companion.exists():
                self.existed.add(companion)

    def remove(self) -> None:
        for path in self.watched:
            if path not in self.existed:
                with contextlib.suppress(OSError):
                    path.unlink()


def run_chat(args: argparse.Namespace) -> int:
    if args.continue_reply:
        _check_continue(args)
        message = ""
    else:
        message = _read_stdin() if args.message == "-" else (args.message or "")
    if not message.strip() and not args.continue_reply:
        raise CliError("the message is empty")
    instructions = args.instructions
    if args.instructions_file:
        try:
            instructions = Path(args.instructions_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"cannot read instructions file: {error}") from error
    _check_engine_options(args)
    documents = [read_document(path) for path in args.document]  # refused before any write
    new_files = _NewFiles(Path(args.db).expanduser())
    try:
        store = _open_store(args.db)
    except BaseException:
        new_files.remove()
        raise
    try:
        new_files.watch(store.kv_path)
        # The model (and the context size) is checked before anything is written.
        engine = _open_session(args, store)
    except BaseException:
        store.close()
        new_files.remove()
        raise
    with store:
        try:
            return _chat_turn(args, store, engine, message, instructions, documents)
        finally:
            engine.close()


def _read_stdin() -> str:
    """Standard input as text; bytes that are not UTF-8 are kept as surrogate escapes,
    as Python keeps them in argv (stored exactly, exported readably)."""
    return sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")


def _chat_turn(
    args: argparse.Namespace,
    store: Store,
    engine: ChatEngine,
    message: str,
    instructions: str | None,
    documents: list[DocumentText],
) -> int:
    found = store.chat_by_name(args.chat)
    if found is None and args.continue_reply:
        raise CliError(f"no chat named {args.chat!r} to continue")
    chat = found or store.create_chat(args.chat, args.layout or Layout.HISTORY_FIRST)
    if args.layout and chat.layout != args.layout:
        chat = store.update_chat(chat.id, layout=args.layout)
    if args.no_history and not chat.no_history:
        chat = store.update_chat(chat.id, no_history=1)
    attached = {(d.name, d.text) for d in store.documents(chat.id)}
    for document in documents:
        if (document.name, document.text) not in attached:
            store.attach_document(chat.id, document.name, document.text)
            attached.add((document.name, document.text))
    variables = dict(args.var)
    current = store.current_instructions(chat.id)
    if instructions is not None or variables:
        text = instructions if instructions is not None else (current.text if current else "")
        if current is None or current.text != text or current.variables != variables:
            store.add_instruction_version(chat.id, text, variables)
    if args.trim_tokens is not None or args.trim_mode is not None:
        engine.activate(chat.id)
        engine.set_trim(
            chat.id,
            args.trim_tokens if args.trim_tokens is not None else chat.trim_tokens,
            args.trim_mode,
        )
    options = GenerationOptions(
        args.max_tokens, args.temperature, args.seed, alternatives=args.alternatives
    )
    if args.continue_reply:
        result, stored_reply, warnings = _continue(engine, chat.id, options)
    else:
        result, stored_reply, warnings = _answer(engine, store, chat.id, message, options)
    template_warning = engine.template_warning()
    if template_warning:
        warnings.insert(0, template_warning)  # never a silent ChatML fallback
    reply = result.reply if result is not None else stored_reply.text if stored_reply else ""
    metrics = result.metrics.as_dict() if result is not None else {}
    if warnings and metrics:
        metrics["notes"] = [*metrics.get("notes", []), *warnings]
    replies = [a.text for a in result.alternatives] if result is not None else []
    if args.json:
        payload = {"reply": reply, "metrics": metrics}
        if args.alternatives > 1:
            payload["replies"] = replies or ([reply] if reply else [])
        print(json.dumps(payload, ensure_ascii=False))
    elif len(replies) > 1:
        for number, text in enumerate(replies, 1):
            print(f"[{number}/{len(replies)}{', kept' if number == 1 else ''}]\n{text}")
    else:
        print(reply)
        if result is not None:
            m = result.metrics
            print(
                f"[reused {m.reused_tokens}, prefilled {m.prefill_tokens}, "
                f"background {m.background_tokens} tokens; TTFT {m.ttft_ms:.0f} ms]",
                file=sys.stderr,
            )
    for warning in warnings:
        print(f"kvchat: warning: {warning}", file=sys.stderr)
    return 0


def history_payload(store: Store, name: str) -> dict[str, Any]:
    chat = store.chat_by_name(name)
    if chat is None:
        raise CliError(f"no chat named {name!r}")
    return {
        "chat": {
            "name": chat.name,
            "layout": chat.layout,
            "trim_tokens": chat.trim_tokens,
            "trim_mode": chat.trim_mode,
            "cache_start_seq": chat.cache_start_seq,
        },
        "messages": [
            {
                "seq": m.seq,
                "role": m.role,
                "text": m.text,
                "status": m.status,
                "tokens": len(m.token_ids),
                "instruction_version": m.instruction_version,
                "in_cache": m.seq >= chat.cache_start_seq,
                "created_at": m.created_at,
                "finished_at": m.finished_at,
            }
            for m in store.messages(chat.id)
        ],
        "instructions": [
            {
                "version": v.version,
                "text": v.text,
                "variables": v.variables,
                "created_at": v.created_at,
            }
            for v in store.instruction_versions(chat.id)
        ],
        "metrics": [row.data for row in store.metrics(chat.id)],
    }


def run_history(args: argparse.Namespace) -> int:
    if not Path(args.db).expanduser().exists():
        raise CliError(f"database not found: {args.db}")
    with Store(Path(args.db).expanduser(), read_only=True) as store:
        payload = history_payload(store, args.chat)
    if args.json:
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    for version in payload["instructions"]:
        print(f"[instructions v{version['version']}] {version['text']}")
    for message in payload["messages"]:
        print(f"{message['role']}: {message['text']}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if not Path(args.db).expanduser().exists():
        raise CliError(f"database not found: {args.db}")
    with Store(Path(args.db).expanduser(), read_only=True) as store:
        chat = store.chat_by_name(args.chat)
        if chat is None:
            raise CliError(f"no chat named {args.chat!r}")
        out = Path(args.out).expanduser() if args.out else _default_export(store, chat, args)
        if args.all_versions and out.suffix.lower() != ".json":
            raise CliError("--all-versions writes JSON: give --out a .json name")
        try:
            target = export_chat(store, chat.id, out, all_versions=args.all_versions)
        except OSError as error:
            raise CliError(f"cannot write {out}: {error.strerror or error}") from error
    print(target)
    return 0


def _default_export(store: Store, chat: Chat, args: argparse.Namespace) -> Path:
    """The chat's name (its family's, as the window shows it) in the documents folder."""
    import platformdirs

    suffix = ".json" if args.all_versions else ".md"
    title = store.chat(chat.family_id).name
    folder = Path(platformdirs.user_documents_dir())
    folder = folder if folder.is_dir() else Path.home()  # no documents folder: home
    return folder / export_file_name(title, suffix)


def run_fork(args: argparse.Namespace) -> int:
    if not Path(args.db).expanduser().exists():
        raise CliError(f"database not found: {args.db}")
    with _open_store(args.db) as store:
        source = store.chat_by_name(args.chat)
        if source is None:
            raise CliError(f"no chat named {args.chat!r}")
        fork = store.fork_chat(source.id, args.at, args.name)
        count = len(store.messages(fork.id))
    if args.json:
        print(json.dumps({"chat": fork.name, "from": source.name, "at": args.at,
                          "messages": count}, ensure_ascii=False))
    else:
        print(f"{fork.name}: {count} messages from {source.name}")
    return 0


MB = 1_000_000  # storage figures in and out are decimal megabytes


def storage_payload(store: Store) -> dict[str, Any]:
    names = {chat.id: chat.name for chat in store.chats()}
    if store.read_only and not store.kv_path.exists():  # no state saved yet
        return {"kv_path": str(store.kv_path), "total_bytes": 0,
                "budget_bytes": DEFAULT_BUDGET_BYTES, "chats": []}
    kv = store.kv
    return {
        "kv_path": str(store.kv_path),
        "total_bytes": kv.total_bytes(),
        "budget_bytes": kv.budget_bytes,
        "chats": [
            {"name": names.get(use.chat_id, f"#{use.chat_id}"), "bytes": use.bytes,
             "shared_bytes": use.shared_bytes}
            for use in kv.usage()
        ],
    }


def run_storage(args: argparse.Namespace) -> int:
    if not Path(args.db).expanduser().exists():
        raise CliError(f"database not found: {args.db}")
    if args.set_budget_mb:
        with _open_store(args.db) as store:
            store.kv.set_budget(args.set_budget_mb * MB)  # MB in, MB out: one unit
            payload = storage_payload(store)
    else:  # read-only: works while a chat writes, and writes nothing
        with Store(Path(args.db).expanduser(), read_only=True) as store:
            payload = storage_payload(store)
    if args.json:
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    print(f"{payload['kv_path']}: {payload['total_bytes'] / MB:.1f} MB of "
          f"{payload['budget_bytes'] / MB:.0f} MB")
    for chat in payload["chats"]:
        print(f"  {chat['name']}: {chat['bytes'] / MB:.1f} MB "
              f"({chat['shared_bytes'] / MB:.1f} MB shared)")
    return 0


def _fail(message: str) -> int:
    """An expected failure: one line on stderr, never a traceback."""
    print(f"kvchat: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # text from raw argv/stdin bytes: escaped
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for field in ("chat", "name"):  # one form of a name everywhere (see valid_chat_name)
            if getattr(args, field, None) is not None:
                setattr(args, field, valid_chat_name(getattr(args, field)))
        if args.command == "chat":
            return run_chat(args)
        if args.command == "history":
            return run_history(args)
        if args.command == "fork":
            return run_fork(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "storage":
            return run_storage(args)
        if args.command == "eval":
            from app.eval.cli import run_eval_command

            return run_eval_command(args)
        if getattr(args, "gui_stall", False):
            from app.ui.stall import run_gui_stall  # Qt only for this one measurement

            return run_gui_stall(args)
        from app.bench.cli import run_bench

        return run_bench(args)
    except (CliError, SessionError, ModelFileError, StorageError, ValueError) as error:
        return _fail(str(error))
    except DecodeError as error:  # llama.cpp failed outside a turn (a restore, a save)
        return _fail(f"the model failed: {error}")
    except OSError as error:  # a file or a pipe: e.g. a folder that cannot be read
        where = f" ({error.filename})" if error.filename else ""
        return _fail(f"{error.strerror or error}{where}")
    except KeyboardInterrupt:
        print("kvchat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
