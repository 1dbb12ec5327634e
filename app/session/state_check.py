"""Binds a saved state to the chat, token ids and positions it was computed for.

The CRC-32 of a state only says the bytes are the ones that were written; it does
not say *whose* they are. A state copied from another chat (same model, same
length) has a valid CRC and would make this chat answer about the other chat's
topic. The binding is a keyed BLAKE2b digest over the chat id, the fingerprint,
the token ids, the positions the cells occupy (0 .. n-1, as the mirror keeps them)
and the blob's CRC-32 and length, stored next to the state and checked before the
state is restored. Covering the CRC (rather than the tens of MB of the blob a
second time) keeps the check cheap: a byte flipped in the blob changes its CRC, and
a CRC "fixed up" to match no longer matches the binding.

It guards against mix-ups and edits of the database, not against someone who
recomputes the digest with this source at hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping, Sequence

from app.storage.records import pack_tokens

_KEY = b"kvchat saved-state binding v1"


def state_binding(
    chat_id: int,
    fingerprint: Mapping[str, object],
    token_ids: Sequence[int],
    checksum: int,
    state_length: int,
) -> bytes:
    """32-byte digest tying a state blob (via its CRC and length) to a chat and its tokens."""
    digest = hashlib.blake2b(key=_KEY, digest_size=32)
    digest.update(struct.pack("<q", chat_id))
    digest.update(json.dumps(dict(fingerprint), sort_keys=True).encode())
    first, last = (0, len(token_ids) - 1) if token_ids else (-1, -1)
    digest.update(struct.pack("<qqq", len(token_ids), first, last))
    digest.update(pack_tokens(list(token_ids)))
    digest.update(struct.pack("<Iq", checksum & 0xFFFFFFFF, state_length))
    return digest.digest()


def binding_problem(
    stored: bytes | None,
    chat_id: int,
    fingerprint: Mapping[str, object],
    token_ids: Sequence[int],
    checksum: int,
    state_length: int,
) -> str | None:
    """Why a stored binding does not vouch for this state, or None when it does."""
    if not stored:
        return "the saved state has no binding to its chat (saved by an older version)"
    expected = state_binding(chat_id, fingerprint, token_ids, checksum, state_length)
    if not hmac.compare_digest(stored, expected):
        return (
            "the saved state is not bound to this chat's token ids (copied from another "
            "chat or altered)"
        )
    return None
