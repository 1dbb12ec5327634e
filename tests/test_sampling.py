"""Sampling settings reach llama.cpp's sampler chain (real model) and bad values are refused."""

from __future__ import annotations

import pytest

from app.domain import Sampling
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

QUESTION = "Name three things a lighthouse keeper checks each evening."


def _reply(engine: ChatSession, store: Store, name: str, options: GenerationOptions) -> str:
    chat = store.create_chat(name)
    return engine.send(chat.id, QUESTION, options).reply


def test_top_k_one_is_greedy_whatever_the_temperature(engine: ChatSession, store: Store) -> None:
    greedy = _reply(engine, store, "greedy", GenerationOptions(max_tokens=24, temperature=0.0))
    hot = GenerationOptions(max_tokens=24, temperature=1.8, seed=7, sampling=Sampling(top_k=1))
    assert _reply(engine, store, "top-k 1", hot) == greedy
    wide = GenerationOptions(
        max_tokens=24, temperature=1.8, seed=7, sampling=Sampling(top_k=0, top_p=1.0)
    )
    assert _reply(engine, store, "wide", wide) != greedy, "the chain really changed"


def test_the_turn_records_its_sampling(engine: ChatSession, store: Store) -> None:
    sampling = Sampling(top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.1)
    chat = store.create_chat("recorded")
    options = GenerationOptions(max_tokens=4, seed=3, sampling=sampling)
    result = engine.send(chat.id, QUESTION, options)
    stored = store.metrics(chat.id)[-1].data
    assert stored["seed"] == 3 and result.metrics.seed == 3
    assert stored["sampling"] == {"top_k": 20, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1}


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (Sampling(top_k=-1), "top-k -1 is out of range"),
        (Sampling(top_p=1.5), "top-p 1.5 is out of range"),
        (Sampling(min_p=float("nan")), "min-p nan is out of range"),
        (Sampling(repeat_penalty=0.5), "repeat penalty 0.5 is out of range"),
    ],
)
def test_out_of_range_sampling_is_refused_in_one_line(sampling: Sampling, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationOptions(sampling=sampling)


def test_a_repeat_penalty_changes_a_greedy_reply(engine: ChatSession, store: Store) -> None:
    plain = GenerationOptions(max_tokens=40, temperature=0.0)
    penalised = GenerationOptions(
        max_tokens=40, temperature=0.0, sampling=Sampling(repeat_penalty=2.5)
    )
    assert _reply(engine, store, "plain", plain) != _reply(engine, store, "penalised", penalised)
