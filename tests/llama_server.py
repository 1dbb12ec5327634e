"""A real llama-server for the server-engine tests: built once, started on a free port.

The binary comes from ``scripts/build_llama_server.sh`` (llama.cpp vendored in the pinned
llama-cpp-python sdist, cached outside the checkout). When it is missing, the fixture
builds it, so the README's one test command stays one command; set
``KVCHAT_SKIP_SERVER_TESTS=1`` to skip these tests instead of building.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.core.models import default_model_path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
SKIP_VARIABLE = "KVCHAT_SKIP_SERVER_TESTS"
SERVER_CTX = 2048


def llama_server_binary() -> Path:
    """The cached binary, built now if it is not there yet (about 10 minutes, once)."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: llama-server tests skipped on request")
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=90 * 60,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},  # this venv's pip fetches the sdist
    )
    if done.returncode != 0:
        raise RuntimeError(f"building llama-server failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def serve_default_model(folder: Path) -> Iterator[LlamaServer]:
    """The embedded model on a llama-server for a test module: slot files and log in
    ``folder``; stopped when the module's tests are done."""
    slots = folder / "slots"
    slots.mkdir()
    running = LlamaServer(llama_server_binary(), default_model_path(), slots, folder / "server.log")
    running.start()
    yield running
    running.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LlamaServer:
    """One llama-server process with slot saving; ``restart`` keeps the port and slot files."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        slot_dir: Path,
        log: Path,
        n_ctx: int = SERVER_CTX,
        parallel: int = 1,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.extra = extra
        self.parallel = parallel
        self.n_ctx = n_ctx
        self.model = model
        self.slot_dir = slot_dir
        self.log = log
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def start(self) -> None:
        command = [
            str(self.binary),
            "--model", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--ctx-size", str(self.n_ctx * self.parallel),  # split among the slots
            "--parallel", str(self.parallel),  # 1: chats share the slot, switching restores
            "--cache-ram", "0",  # no host-memory prompt cache: the slot alone is measured
            "--slot-save-path", f"{self.slot_dir}/",
            "--threads", "2",
            *self.extra,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama-server did not become healthy within 120 s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
