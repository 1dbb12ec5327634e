"""A chat process for crash tests: prints markers so the test knows when to SIGKILL it.

Usage: python crash_worker.py DB MODE   (MODE: prefill | generate | save)
"""

from __future__ import annotations

import sys
import time

from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

LONG_MESSAGE = (
    "Please summarise the following notes. " + "The river bends past the old mill. " * 160
)


def main() -> None:
    db_path, mode = sys.argv[1], sys.argv[2]
    store = Store(db_path, exclusive=True)
    engine = ChatSession(store, n_ctx=2048)
    chat = store.chat_by_name("crash") or store.create_chat("crash")
    options = GenerationOptions(max_tokens=400, temperature=0.0)

    def progress(phase: str, done: int, total: int) -> None:
        print(f"PREFILL {phase} {done}/{total}", flush=True)
        time.sleep(0.05)

    def token(piece: str) -> None:
        print("TOKEN", flush=True)

    if mode == "prefill":
        engine.send(chat.id, LONG_MESSAGE, options, progress=progress)
    elif mode == "generate":
        engine.send(
            chat.id, "Tell me a very long story about a lighthouse.", options, on_token=token
        )
    else:
        engine.send(chat.id, LONG_MESSAGE, GenerationOptions(max_tokens=8, temperature=0.0))
        engine.after_reply(chat.id)
        print("SAVED-ONE", flush=True)
        original = store.kv.save_state

        def announced(*args, **kwargs) -> int:
            print("SAVING", flush=True)
            written = original(*args, **kwargs)
            print("SAVED", flush=True)
            return written

        store.kv.save_state = announced  # type: ignore[method-assign]
        for index in range(50):
            engine.send(chat.id, f"Short question {index}?", GenerationOptions(8, 0.0))
            engine.after_reply(chat.id)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
