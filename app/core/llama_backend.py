"""A thin, typed layer over llama.cpp's C API (llama-cpp-python's ctypes bindings).

Only this module touches llama.cpp. It owns one model, one context and one
sequence (id 0), and exposes what the cache logic needs: tokenize, decode a run of
tokens at given positions, sample, remove/shift cells, and get/set the sequence's
state. It is not thread-safe: the engine's single worker thread owns it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from app import limits
from app.core.chat_template import TemplateProbeError
from app.core.errors import (
    ContextFullError as ContextFullError,
)
from app.core.errors import (
    DecodeAborted as DecodeAborted,
)
from app.core.errors import (
    DecodeError as DecodeError,
)
from app.core.errors import (
    ModelLoadCancelled as ModelLoadCancelled,
)
from app.core.errors import (
    ModelLoadError as ModelLoadError,
)
from app.core.models import check_gguf_file
from app.domain import KVType, Sampling

SEQ = 0
PENALTY_LAST_N = 64  # the repeat penalty looks at this many of the reply's last tokens
#: A second sequence that shares sequence 0's cells for the length of one state copy:
#: llama.cpp serializes a whole sequence, so the cells of a range are serialized by
#: tagging them with this sequence (no data moves), reading it, and untagging them.
RANGE_SEQ = 1
#: Alternatives (several replies sampled at once from one prompt) run as sequences
#: 0 and ALTERNATIVE_SEQ.. that share the prompt's cells (at most limits.MAX_ALTERNATIVES).
ALTERNATIVE_SEQ = 2
#: ``bool (*)(void *)``: llama.cpp's abort callback, polled while a decode runs.
_ABORT_CALLBACK = llama_cpp.ggml_abort_callback
KV_TYPES = {KVType.F16: llama_cpp.GGML_TYPE_F16, KVType.Q8_0: llama_cpp.GGML_TYPE_Q8_0}

_log_lines: collections.deque[str] = collections.deque(maxlen=40)
_log_lock = threading.Lock()
_backend_ready = False


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]  # a ctypes callback type
def _log_to_buffer(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's chatter off stderr but remember it for error messages."""
    del level, user_data
    with _log_lock:
        _log_lines.append(text.decode("utf-8", errors="replace"))


def _ensure_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_log_set(_log_to_buffer, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def recent_log(lines: int = 6) -> str:
    with _log_lock:
        text = "".join(list(_log_lines)[-lines:])
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def llama_cpp_version() -> str:
    return str(getattr(llama_cpp, "__version__", "unknown"))


def builtin_template_names() -> list[str]:
    """The chat formats llama.cpp writes itself (``llama_chat_builtin_templates``)."""
    count = int(llama_cpp.llama_chat_builtin_templates((ctypes.c_char_p * 1)(), 0))
    names = (ctypes.c_char_p * max(count, 1))()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return [name.decode() for name in names[:count] if name]


class BuiltinTemplateRenderer:
    """Renders a conversation with one of llama.cpp's built-in chat formats.

    These are C++ formatters, not Jinja sources: ``llama_chat_apply_template`` with the
    name writes the conversation, so the probe in ``chat_template`` cuts them into
    pieces with sentinel contents exactly as it cuts a Jinja template. This offers every
    format llama.cpp knows, written exactly as llama.cpp (and llama-server) writes it,
    with no copied templates to keep in step with it.
    """

    def __init__(self, name: str) -> None:
        if name not in builtin_template_names():
            raise ValueError(
                f"unknown chat template {name!r}; llama.cpp's built-in ones are: "
                + ", ".join(builtin_template_names())
            )
        self.name = name

    def render(self, messages: list[dict[str, object]], add_generation_prompt: bool = False) -> str:
        chat = (llama_cpp.llama_chat_message * max(len(messages), 1))()
        keep: list[bytes] = []
        for index, message in enumerate(messages):
            role = str(message["role"]).encode()
            content = str(message["content"]).encode("utf-8", errors="replace")
            keep.extend((role, content))
            chat[index].role = role
            chat[index].content = content
        size = 4096
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            written = int(
                llama_cpp.llama_chat_apply_template(
                    self.name.encode(), chat, len(messages), add_generation_prompt, buffer, size
                )
            )
            if written < 0:
                raise TemplateProbeError(f"llama.cpp cannot write this chat as {self.name}")
            if written <= size:
                return buffer.raw[:written].decode("utf-8", errors="replace")
            size = written
        raise TemplateProbeError(f"llama.cpp's {self.name} output keeps growing")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    description: str
    n_params: int
    size_bytes: int
    n_ctx_train: int
    n_layer: int
    n_embd: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    architecture: str = ""  # general.architecture, e.g. "llama", "gemma3"
    name: str = ""  # general.name and general.size_label, e.g. "SmolLM2 135M Instruct"

    @property
    def display_name(self) -> str:
        """What people call the model: its GGUF name and size, then llama.cpp's quant type.

        llama.cpp's own description guesses the size from the layer count ("llama 256M
        Q4_1" for a 135M model); only its last word, the quantization, is kept.
        """
        quant = self.description.rsplit(" ", 1)[-1] if self.description else ""
        if not self.name:
            return self.description
        return f"{self.name} · {quant}" if quant else self.name


class LlamaBackend:
    """One model + one context + sequence 0, driven through llama.cpp's C API."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        n_threads: int | None = None,
        n_batch: int = 512,
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if n_ctx is not None:
            limits.check_n_ctx(n_ctx)
        path = check_gguf_file(model_path)
        if kv_type not in KV_TYPES:
            raise ValueError(f"unknown KV cache type {kv_type!r}; use one of {', '.join(KV_TYPES)}")
        _ensure_backend()
        self.path = path
        self.kv_type = kv_type
        self._model = None
        self._ctx = None
        self._batch = None

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # No extra CPU buffer types (AMX, weight repacking): llama.cpp's AMX matmul crashes
        # on AMX-capable Xeons for this build, and a repacked layout would make results
        # depend on which kernels the machine picks.
        model_params.use_extra_bufts = False
        if progress is not None or cancel is not None:

            def report(fraction: float, user_data: ctypes.c_void_p) -> bool:
                # Called by llama.cpp once per tensor: returning False aborts the load.
                if cancel is not None and cancel.is_set():
                    return False
                if progress is not None:
                    progress(float(fraction))
                return True

            self._progress_cb = llama_cpp.llama_progress_callback(report)
            model_params.progress_callback = self._progress_cb
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            if cancel is not None and cancel.is_set():
                raise ModelLoadCancelled(f"loading {path.name} was cancelled")
            raise ModelLoadError(
                f"llama.cpp could not load {path.name}: {recent_log() or 'unknown error'}"
            )
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)

        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        wanted_ctx = n_ctx or min(n_ctx_train or 8192, 8192)
        threads = n_threads or max(1, os.cpu_count() or 1)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = wanted_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        # Sequences over one unified cache: sequence 0 is the chat, RANGE_SEQ only ever
        # tags cells of sequence 0 while a range of them is serialized (get_state_from),
        # and ALTERNATIVE_SEQ.. hold the other replies of alternatives while they are sampled.
        ctx_params.n_seq_max = ALTERNATIVE_SEQ + limits.MAX_ALTERNATIVES - 1
        ctx_params.kv_unified = True
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        # Sliding-window layers keep every cell in memory (llama.cpp's swa_full), so any
        # prefix of the cache can be kept and extended exactly; costs the full KV size for
        # those layers instead of a window's.
        ctx_params.swa_full = True
        ctx_params.type_k = KV_TYPES[KVType(kv_type)]
        ctx_params.type_v = KV_TYPES[KVType(kv_type)]
        # Without flash attention, llama.cpp's CPU results for a token do not depend on how
        # the prompt was split into batches, so a reply computed on a reused cache is the
        # reply of a cold evaluation. A quantized V cache needs flash attention, though.
        ctx_params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            if kv_type == "f16"
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        )
        ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            self._model = None
            raise ModelLoadError(
                f"llama.cpp could not create a context (n_ctx={wanted_ctx}, kv={kv_type}) for "
                f"{path.name}: {recent_log() or 'unknown error'}"
            )
        self._ctx = ctx
        if cancel is not None and cancel.is_set():
            self.close()
            raise ModelLoadCancelled(f"loading {path.name} was cancelled")
        self._memory = llama_cpp.llama_get_memory(ctx)
        # llama.cpp polls this between the graph's nodes while llama_decode runs; it is
        # installed only for the decodes that can be cancelled (see decode()).
        self._abort_event: threading.Event | None = None
        self._abort_cb = _ABORT_CALLBACK(self._should_abort)
        self._abort_installed = False
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        # llama.cpp lowers n_batch/n_ubatch to the requested n_ctx (before padding it) and
        # aborts the process (GGML_ASSERT) on a larger llama_decode call: every run we
        # send must fit the batch sizes the context actually got.
        self.n_batch = max(
            1, min(n_batch, int(llama_cpp.llama_n_batch(ctx)), int(llama_cpp.llama_n_ubatch(ctx)))
        )
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.info = self._read_info(n_ctx_train)

    # -- model facts ----------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(1 << 16)
        length = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        if length < 0:
            return None
        if length >= len(buffer):
            buffer = ctypes.create_string_buffer(length + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace")

    def _read_info(self, n_ctx_train: int) -> ModelInfo:
        description = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, description, len(description))
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        return ModelInfo(
            path=self.path,
            description=description.value.decode("utf-8", errors="replace"),
            n_params=int(llama_cpp.llama_model_n_params(self._model)),
            size_bytes=int(llama_cpp.llama_model_size(self._model)),
            n_ctx_train=n_ctx_train,
            n_layer=int(llama_cpp.llama_model_n_layer(self._model)),
            n_embd=int(llama_cpp.llama_model_n_embd(self._model)),
            chat_template=self._meta("tokenizer.chat_template"),
            bos_token=self.token_text(bos) if bos >= 0 else "",
            eos_token=self.token_text(eos) if eos >= 0 else "",
            architecture=self._meta("general.architecture") or "",
            name=self._display_name(),
        )

    def _display_name(self) -> str:
        """general.name, with general.size_label unless the name already says it."""
        name = (self._meta("general.name") or "").strip()
        size = (self._meta("general.size_label") or "").strip()
        if name and size and size.lower() not in name.lower():
            return f"{name} {size}"
        return name

    def token_text(self, token: int) -> str:
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    @property
    def bos_token_id(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._vocab))

    @property
    def adds_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_control(self._vocab, token))

    @property
    def sliding_window(self) -> int:
        """The sliding-window size of the model's SWA layers; 0 when it has none."""
        return max(0, int(llama_cpp.llama_model_n_swa(self._model)))

    @property
    def can_shift(self) -> bool:
        return bool(llama_cpp.llama_memory_can_shift(self._memory))

    @property
    def memory_kind(self) -> str:
        """"attention" (KV cells per token), "recurrent" (Mamba, RWKV) or "hybrid" (both)."""
        if llama_cpp.llama_model_is_hybrid(self._model):
            return "hybrid"
        if llama_cpp.llama_model_is_recurrent(self._model):
            return "recurrent"
        return "attention"

    @property
    def partial_removal(self) -> bool:
        """Whether the memory can drop the cells of a partial range of positions.

        Recurrent state holds no per-token cells: llama.cpp refuses such a removal
        (``llama_memory_seq_rm`` returns false) and only the whole sequence can go.
        """
        return self.memory_kind == "attention"

    # -- text <-> tokens ------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Tokens of ``text``; ``special`` parses markup such as <|im_start|> into control tokens.

        User text is always tokenized with ``special=False`` so it can never inject markup.
        """
        if not text:
            return []
        # Unpaired surrogates (possible in Python strings) are not UTF-8: the model sees '?'.
        data = text.encode("utf-8", errors="replace")
        capacity = len(data) + 16
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buffer, capacity, False, special
        )
        if count < 0:
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, False, special
            )
        if count < 0:
            raise ValueError("the tokenizer rejected the text")
        return list(buffer[:count])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        length = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = llama_cpp.llama_token_to_piece(
                self._vocab, token, buffer, len(buffer), 0, special
            )
        return buffer.raw[:length]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        data = b"".join(self.token_bytes(token, special=special) for token in tokens)
        return data.decode("utf-8", errors="replace")

    # -- KV cache of sequence 0 -------------------------------------------------------

    def decode(
        self,
        tokens: list[int],
        start_pos: int,
        *,
        logits_for_last: bool,
        cancel: threading.Event | None = None,
    ) -> None:
        """Evaluate ``tokens`` at positions start_pos.. in one llama_decode call (≤ n_batch).

        With ``cancel``, llama.cpp polls it while computing and stops within one graph
        node of it being set (DecodeAborted). llama.cpp then removes the positions of the
        micro-batch it was computing; earlier micro-batches of the call stay in memory.
        """
        count = len(tokens)
        if count == 0:
            return
        if count > self.n_batch:
            raise ValueError("decode() takes at most n_batch tokens; split the run")
        if start_pos + count > self.n_ctx:
            raise ContextFullError(
                f"{start_pos + count - self.n_ctx} tokens over the context size {self.n_ctx}"
            )
        batch = self._batch
        assert batch is not None, "the backend is closed"
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = start_pos + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = SEQ
            batch.logits[index] = 0
        if logits_for_last:
            batch.logits[count - 1] = 1
        batch.n_tokens = count
        self._set_abort(cancel)
        try:
            status = llama_cpp.llama_decode(self._ctx, batch)
        finally:
            self._set_abort(None)
        if status == 2:
            raise DecodeAborted(f"llama_decode of {count} tokens was cancelled")
        if status == 1:
            raise ContextFullError(f"no free KV cells for {count} tokens ({recent_log(2)})")
        if status != 0:
            raise DecodeError(f"llama_decode failed with status {status}: {recent_log(2)}")

    def decode_sequences(self, entries: list[tuple[int, int, int]]) -> None:
        """Evaluate one token per sequence in one llama_decode call: ``entries`` are
        (token, position, sequence id); logits are kept for each (batch index = entry
        index), so every sequence's next token is sampled from this one decode."""
        count = len(entries)
        if count == 0:
            return
        if count > self.n_batch:
            raise ValueError("decode_sequences() takes at most n_batch tokens")
        batch = self._batch
        assert batch is not None, "the backend is closed"
        for index, (token, position, sequence) in enumerate(entries):
            if position >= self.n_ctx:
                raise ContextFullError(f"position {position} is past the context size")
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = 1
        batch.n_tokens = count
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status == 1:
            raise ContextFullError(f"no free KV cells for {count} tokens ({recent_log(2)})")
        if status != 0:
            raise DecodeError(f"llama_decode failed with status {status}: {recent_log(2)}")

    def copy_sequence(self, target: int) -> None:
        """Tag every cell of sequence 0 with ``target`` too (no data moves: the cells
        are shared until either sequence writes past them)."""
        llama_cpp.llama_memory_seq_cp(self._memory, SEQ, target, -1, -1)

    def remove_sequence(self, sequence: int) -> None:
        """Drop every cell of a sequence other than 0 (cells shared with 0 stay for 0)."""
        if sequence == SEQ:
            raise ValueError("sequence 0 is the chat: use remove_cells")
        llama_cpp.llama_memory_seq_rm(self._memory, sequence, -1, -1)

    def sequence_last_position(self, sequence: int) -> int:
        """Largest position held for ``sequence``; -1 when it holds nothing."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, sequence))

    def _should_abort(self, user_data: ctypes.c_void_p) -> bool:
        event = self._abort_event
        return event is not None and event.is_set()

    def _set_abort(self, cancel: threading.Event | None) -> None:
        self._abort_event = cancel
        wanted = cancel is not None
        if wanted != self._abort_installed:
            # Installed only while needed: each poll takes the GIL from llama.cpp's thread.
            callback = self._abort_cb if wanted else _ABORT_CALLBACK()
            llama_cpp.llama_set_abort_callback(self._ctx, callback, ctypes.c_void_p(0))
            self._abort_installed = wanted

    def try_remove_cells(self, start: int, end: int = -1) -> bool:
        """Drop sequence 0's cells with positions in [start, end) (end < 0: to the end).

        False when the memory refuses (a partial range of recurrent state); the
        memory is then left as it was.
        """
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, SEQ, start, end))

    def remove_cells(self, start: int, end: int = -1) -> None:
        if not self.try_remove_cells(start, end):
            raise DecodeError(f"llama.cpp refused to remove cells [{start}, {end})")

    def shift_cells(self, start: int, end: int, delta: int) -> None:
        llama_cpp.llama_memory_seq_add(self._memory, SEQ, start, end, delta)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def last_position(self) -> int:
        """Largest position held for sequence 0, -1 when empty."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, SEQ))

    def first_position(self) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self._memory, SEQ))

    def state_size(self) -> int:
        return int(llama_cpp.llama_state_seq_get_size(self._ctx, SEQ))

    def get_state(self) -> bytearray:
        """The sequence's serialized KV cells, written by llama.cpp straight into the result.

        A state is ~23 KB per token; copying it again would hold the GIL for tens of ms.
        """
        size = self.state_size()
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(self._ctx, view, size, SEQ)
        del view  # release the export so the bytearray may be resized
        if written <= 0:
            raise DecodeError("llama.cpp could not serialize the sequence state")
        del data[written:]
        return data

    def get_state_from(self, start: int) -> bytearray:
        """Like get_state, but only the cells at positions >= ``start``.

        Costs the range's bytes, not the whole sequence's: a save of a long chat copies
        out only the pages it has not stored yet. The cell metadata names RANGE_SEQ.
        """
        llama_cpp.llama_memory_seq_cp(self._memory, SEQ, RANGE_SEQ, start, -1)
        try:
            size = int(llama_cpp.llama_state_seq_get_size(self._ctx, RANGE_SEQ))
            data = bytearray(size)
            view = (ctypes.c_uint8 * size).from_buffer(data)
            written = llama_cpp.llama_state_seq_get_data(self._ctx, view, size, RANGE_SEQ)
            del view
        finally:
            llama_cpp.llama_memory_seq_rm(self._memory, RANGE_SEQ, -1, -1)
        if written <= 0:
            raise DecodeError("llama.cpp could not serialize the sequence state")
        del data[written:]
        return data

    def set_state(self, data: bytes | bytearray) -> bool:
        """Load a sequence state; False (cache left empty) if llama.cpp rejects it."""
        self.clear()
        if not data:
            return False
        # Point llama.cpp at the bytes object itself: a saved state can be tens of MB.
        pointer: ctypes.Array[ctypes.c_uint8] | ctypes._Pointer[ctypes.c_uint8]
        if isinstance(data, bytearray):
            pointer = (ctypes.c_uint8 * len(data)).from_buffer(data)
        else:
            pointer = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        read = llama_cpp.llama_state_seq_set_data(self._ctx, pointer, len(data), SEQ)
        if read == 0:
            self.clear()
            return False
        return True

    # -- sampling -------------------------------------------------------------------

    def make_sampler(
        self, temperature: float, seed: int, sampling: Sampling | None = None
    ) -> Sampler:
        return Sampler(self, temperature, seed, sampling or Sampling())

    def _sample(self, sampler_ptr: int, index: int = -1) -> int:
        return int(llama_cpp.llama_sampler_sample(sampler_ptr, self._ctx, index))

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Sampler:
    """A llama.cpp sampler chain: greedy at temperature 0, else temperature + seeded dist.

    Seed -1 is random (llama.cpp's LLAMA_DEFAULT_SEED); any other seed is used as is.
    """

    def __init__(
        self,
        backend: LlamaBackend,
        temperature: float,
        seed: int,
        sampling: Sampling | None = None,
    ) -> None:
        sampling = sampling or Sampling()
        limits.check_temperature(temperature)
        limits.check_seed(seed)
        limits.check_sampling(
            sampling.top_k, sampling.top_p, sampling.min_p, sampling.repeat_penalty
        )
        self._backend = backend
        params = llama_cpp.llama_sampler_chain_default_params()
        chain = llama_cpp.llama_sampler_chain_init(params)
        add = functools.partial(llama_cpp.llama_sampler_chain_add, chain)

        def penalise() -> None:  # over the reply's last tokens, greedy or not
            if sampling.repeat_penalty != 1.0:
                add(
                    llama_cpp.llama_sampler_init_penalties(
                        backend.n_vocab, PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0
                    )
                )

        if temperature <= 0:
            penalise()
            add(llama_cpp.llama_sampler_init_greedy())
        else:  # the cut-offs first: the penalty then scans few candidates, not the vocabulary
            if sampling.top_k:
                add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            if sampling.min_p:
                add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            penalise()
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(limits.llama_seed(seed)))
        self._chain = chain

    def sample(self, index: int = -1) -> int:
        """The next token from the logits of the last decode's ``index``-th token
        (-1: its last one)."""
        return self._backend._sample(self._chain, index)

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
