"""Measure the server engine against a real llama-server: the README's "Server" figures.

Starts llama-server (built by scripts/build_llama_server.sh) with the embedded model on a
free port, then measures with the server's own cache figures:

1. an instruction edit after a long history, history-first vs system-first;
2. the turn after an idle-time warm-up request with max_tokens 0, with 1, and with none;
3. a slot saved, the server restarted, the slot restored: vs the same turn from scratch.

Run: ``.venv/bin/python scripts/server_figures.py [--history-tokens 1500]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.bench.script import Script, block_text
from app.core.models import default_model_path
from app.domain import Layout, Role, Step
from app.remote.session import RemoteChatSession
from app.session.chat_session import IDLE_STEPS, GenerationOptions
from app.storage.store import Store
from tests.llama_server import LlamaServer, llama_server_binary

OPTIONS = GenerationOptions(max_tokens=16, temperature=0.0, seed=0)
FIELDS = ("prompt_tokens", "reused_tokens", "prefill_tokens", "ttft_ms", "state_load_ms")


def _figures(metrics: object) -> dict[str, object]:
    data = metrics.as_dict()  # type: ignore[attr-defined]
    return {name: data[name] for name in FIELDS}


class Scenario:
    """Chats with the same scripted history on one server."""

    def __init__(self, session: RemoteChatSession, history_tokens: int, block_tokens: int):
        self.session = session
        script = Script(lambda text: session.client.tokenize(text) or 0, seed=0)
        self.rules = script.rules(block_tokens)
        self.history: list[tuple[str, str]] = []
        size = 0
        while size < history_tokens:
            user, reply = script.user_message(40), script.reply(80)
            self.history.append((user, reply))
            size += session.client.tokenize(user + reply) or 0
        self.messages = [script.user_message(40) for _ in range(4)]
        self.count = 0

    def chat(self, layout: str) -> int:
        store = self.session.store
        self.count += 1
        chat = store.create_chat(f"chat {self.count}", layout)
        store.add_instruction_version(chat.id, block_text(self.rules, 0))
        for user, reply in self.history:
            store.add_message(chat.id, Role.USER, user)
            store.add_message(chat.id, Role.ASSISTANT, reply)
        self.session.upkeep(chat.id).run()  # untimed: the history on the server
        return chat.id

    def turn(self, chat_id: int, index: int, steps=IDLE_STEPS):  # type: ignore[no-untyped-def]
        turn = self.session.start_turn(chat_id, self.messages[index], OPTIONS, idle_steps=steps)
        metrics = turn.respond().metrics
        turn.run()
        return metrics


def measure(server: LlamaServer, db: Path, history_tokens: int, block_tokens: int) -> dict:
    results: dict[str, dict] = {}
    with Store(db) as store:
        session = RemoteChatSession(store, server.base_url)
        scenario = Scenario(session, history_tokens, block_tokens)
        for layout in (Layout.HISTORY_FIRST, Layout.SYSTEM_FIRST):
            chat = scenario.chat(layout)
            scenario.turn(chat, 0)
            store.add_instruction_version(chat, block_text(scenario.rules, 1))
            results[f"edit, {layout}"] = _figures(scenario.turn(chat, 1))
        for label, tokens in (("warm-up max_tokens 0", 0), ("warm-up max_tokens 1", 1)):
            session.warmup_max_tokens = tokens
            chat = scenario.chat(Layout.HISTORY_FIRST)
            scenario.turn(chat, 0)
            results[label] = _figures(scenario.turn(chat, 1))
        chat = scenario.chat(Layout.HISTORY_FIRST)
        scenario.turn(chat, 0, (Step.SAVE,))
        results["no warm-up"] = _figures(scenario.turn(chat, 1))
        session.warmup_max_tokens = 0
        saved = scenario.chat(Layout.HISTORY_FIRST)
        scenario.turn(saved, 0)
        session.close()
        server.restart()
        session = RemoteChatSession(store, server.base_url)
        scenario.session = session
        results["after restart, slot restored"] = _figures(scenario.turn(saved, 1))
        session.close()
        server.restart()
        session = RemoteChatSession(store, server.base_url)
        cold = store.create_chat("cold copy", Layout.HISTORY_FIRST)
        store.add_instruction_version(cold.id, block_text(scenario.rules, 0))
        for message in store.messages(saved)[:-2]:
            store.add_message(cold.id, message.role, message.text)
        scenario.session = session
        results["after restart, from scratch"] = _figures(scenario.turn(cold.id, 1))
        session.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--block-tokens", type=int, default=300)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvchat-server-") as folder:
        slots = Path(folder) / "slots"
        slots.mkdir()
        server = LlamaServer(
            llama_server_binary(), default_model_path(), slots, Path(folder) / "log", args.n_ctx
        )
        server.start()
        try:
            results = measure(server, Path(folder) / "chats.db", args.history_tokens,
                              args.block_tokens)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'case':32}" + "".join(f"{name:>16}" for name in FIELDS))
    for case, figures in results.items():
        cells = "".join(
            f"{'-' if value is None else round(value):>16}" for value in figures.values()
        )
        print(f"{case:32}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
