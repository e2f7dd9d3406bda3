"""Chained content hashes of full KV blocks: the prefix cache's keys, computed the same way
by every replica's KV cache manager and by the router that mirrors their caches."""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

ROOT_HASH = b"root"  # the parent of a prompt's first block


def check_cache_salt(cache_salt) -> None:
    """ValueError naming `cache_salt` unless it is None or a non-empty string that encodes
    as UTF-8 (a lone surrogate, which a JSON escape can carry, does not): it enters a hash."""
    if cache_salt is None:
        return
    try:
        valid = isinstance(cache_salt, str) and bool(cache_salt) and bool(cache_salt.encode())
    except UnicodeEncodeError:
        valid = False
    if not valid:
        raise ValueError("`cache_salt` must be a non-empty string of valid Unicode")


def new_hash_seed() -> str:
    """A fresh secret seed (hex), for one deployment: its replicas and its router share it."""
    return os.urandom(32).hex()


class BlockHasher:
    """A full block's hash chains its parent block's hash, its `block_size` token ids and,
    for the first block, the request's cache salt, keyed with a secret seed. Equal hashes
    mean equal prefixes (up to a 128-bit collision); without the seed nobody can craft a
    collision, and without the salt a tenant cannot reach another tenant's cached prefixes.
    Two hashers with the same seed and block size give the same hashes (replicas and their
    router); without a seed each hasher draws its own."""

    def __init__(self, block_size: int, seed: bytes | None = None):
        if seed is not None and not 1 <= len(seed) <= 64:
            raise ValueError(f"a hash seed is 1 to 64 bytes (got {len(seed)})")
        self.block_size = block_size
        self._pack_block = struct.Struct(f"<{block_size}i").pack  # a block's token ids (< 2**31) as bytes
        # Keyed once; each block hash copies this state (cheaper than keying anew).
        self._keyed = hashlib.blake2b(key=seed if seed is not None else os.urandom(32), digest_size=16)

    def hash_block(self, parent_hash: bytes, token_ids: Sequence[int], cache_salt: str | None) -> bytes:
        """The hash of one full block, `token_ids` its tokens; `parent_hash` is ROOT_HASH for a
        first block (the only one the salt enters)."""
        return self._digest(parent_hash, self._pack_block(*token_ids), cache_salt)

    def _digest(self, parent_hash: bytes, packed_tokens: bytes, cache_salt: str | None) -> bytes:
        digest = self._keyed.copy()
        digest.update(parent_hash + packed_tokens)
        if parent_hash == ROOT_HASH and cache_salt is not None:
            digest.update(b"salt\0" + cache_salt.encode())
        return digest.digest()

    def prefix_hashes(self, token_ids: Sequence[int], cache_salt: str | None = None,
                      max_blocks: int | None = None) -> list[bytes]:
        """The hashes of the full blocks of `token_ids` (at most `max_blocks`), first block first."""
        size, hashes, parent = self.block_size, [], ROOT_HASH
        count = len(token_ids) // size if max_blocks is None else min(max_blocks, len(token_ids) // size)
        if count == 0:
            return hashes
        # The same bytes as `hash_block` packs block by block, packed in one call (the router
        # hashes whole prompts on every decision).
        packed, width = struct.pack(f"<{count * size}i", *token_ids[:count * size]), 4 * size
        for index in range(count):
            parent = self._digest(parent, packed[index * width:(index + 1) * width], cache_salt)
            hashes.append(parent)
        return hashes
