"""The router's view of every worker's KV cache: a tree of chained block hashes.

Each node is one full block of tokens. Its key is the router's own content hash, chained from the
parent's key and this block's token ids (nano-vllm's scheme), so a prompt the router has never
seen hashes to the same keys as the blocks an engine reported storing. Engines report their own
hashes too; those are kept beside ours, so a BlockRemoved applies in O(1) without knowing how the
engine hashes. A hit re-checks the block's tokens, in case two contents ever share a key.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ROOT_KEY = 0  # the parent key of a prompt's first block


def _token_bytes(token_ids: Iterable[int]) -> bytes:
    return array("I", token_ids).tobytes()


def chain_hash(parent_key: int, tokens: bytes) -> int:
    h = hashlib.blake2b(parent_key.to_bytes(8, "little"), digest_size=8)
    h.update(tokens)
    return int.from_bytes(h.digest(), "little")


def block_keys(token_ids: list[int], block_size: int) -> Iterator[tuple[int, bytes]]:
    """(key, token bytes) for each full block of a token sequence, in order."""
    parent = ROOT_KEY
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = _token_bytes(token_ids[start:start + block_size])
        parent = chain_hash(parent, tokens)
        yield parent, tokens


@dataclass
class Node:
    key: int
    tokens: bytes
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)
    workers: set[str] = field(default_factory=set)


class RadixIndex:
    """Which workers hold which prefix blocks. Not thread-safe: the caller holds a lock."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._nodes: dict[int, Node] = {}
        # worker -> {engine hash -> our key}: removals apply in O(1), and a worker's blocks are
        # the values.
        self._held: dict[str, dict[bytes | int, int]] = {}

    # -- events ----------------------------------------------------------------------------

    def store(self, worker: str, engine_hashes: list, parent_engine_hash, token_ids: list[int]) -> int:
        """Applies a BlockStored. Returns how many blocks were recorded."""
        if len(token_ids) != len(engine_hashes) * self.block_size:
            logger.error("BlockStored from %s has %d tokens for %d blocks of %d; ignored (block size mismatch?)",
                         worker, len(token_ids), len(engine_hashes), self.block_size)
            return 0
        parent = None
        if parent_engine_hash is not None:
            parent_key = self._held.get(worker, {}).get(parent_engine_hash)
            if parent_key is None:
                # The parent's event predates what we replayed (or was lost): without the chain
                # we cannot compute content hashes, so these blocks are not indexed.
                logger.debug("BlockStored from %s with unknown parent; skipped", worker)
                return 0
            parent = self._nodes.get(parent_key)
        held = self._held.setdefault(worker, {})
        for i, engine_hash in enumerate(engine_hashes):
            tokens = _token_bytes(token_ids[i * self.block_size:(i + 1) * self.block_size])
            key = chain_hash(parent.key if parent else ROOT_KEY, tokens)
            node = self._nodes.get(key)
            if node is None:
                node = Node(key, tokens, parent)
                self._nodes[key] = node
                if parent is not None:
                    parent.children[key] = node
            node.workers.add(worker)
            held[engine_hash] = key
            parent = node
        return len(engine_hashes)

    def remove(self, worker: str, engine_hashes: list) -> int:
        held = self._held.get(worker, {})
        removed = 0
        for engine_hash in engine_hashes:
            key = held.pop(engine_hash, None)
            if key is not None:
                self._drop(worker, key)
                removed += 1
        return removed

    def clear(self, worker: str) -> int:
        """Applies AllBlocksCleared, or forgets a worker that left."""
        held = self._held.pop(worker, {})
        for key in held.values():
            self._drop(worker, key)
        return len(held)

    def _drop(self, worker: str, key: int) -> None:
        node = self._nodes.get(key)
        if node is None:
            return
        node.workers.discard(worker)
        # Prune nodes nobody holds and nothing hangs below, walking up the chain.
        while node is not None and not node.workers and not node.children:
            del self._nodes[node.key]
            if node.parent is not None:
                node.parent.children.pop(node.key, None)
            node = node.parent

    # -- queries ---------------------------------------------------------------------------

    def overlaps(self, token_ids: list[int]) -> dict[str, int]:
        """For each worker, how many of the prompt's leading blocks it holds, in a row."""
        result: dict[str, int] = {}
        active: set[str] | None = None
        for depth, (key, tokens) in enumerate(block_keys(token_ids, self.block_size)):
            node = self._nodes.get(key)
            if node is None or node.tokens != tokens:
                break
            active = set(node.workers) if active is None else active & node.workers
            if not active:
                break
            for worker in active:
                result[worker] = depth + 1
        return result

    def num_prompt_blocks(self, token_ids: list[int]) -> int:
        return len(token_ids) // self.block_size

    @property
    def num_blocks(self) -> int:
        return len(self._nodes)

    def blocks_per_worker(self) -> dict[str, int]:
        return {w: len(held) for w, held in self._held.items() if held}

    def workers(self) -> set[str]:
        return {w for w, held in self._held.items() if held}

    def blocks_of(self, worker: str) -> set[int]:
        return set(self._held.get(worker, {}).values())

    # -- snapshots -------------------------------------------------------------------------

    def state(self) -> tuple[list[tuple[int, int, bytes, list[str]]], dict[str, list[tuple]]]:
        """The whole index as plain data: nodes as (key, parent key, tokens, workers), parents
        before children, and each worker's (engine hash, key) pairs."""
        # Insertion order is already parents first: a node is made after its parent, and a
        # parent is never dropped while a child hangs below it.
        nodes = [(n.key, n.parent.key if n.parent else ROOT_KEY, n.tokens, sorted(n.workers))
                 for n in self._nodes.values()]
        return nodes, {w: list(held.items()) for w, held in self._held.items() if held}

    @classmethod
    def restore(cls, block_size: int, nodes, held) -> RadixIndex:
        """The index that ``state`` described."""
        index = cls(block_size)
        for key, parent_key, tokens, workers in nodes:
            parent = index._nodes[parent_key] if parent_key != ROOT_KEY else None
            node = Node(key, tokens, parent, workers=set(workers))
            index._nodes[key] = node
            if parent is not None:
                parent.children[key] = node
        index._held = {w: {engine_hash: key for engine_hash, key in pairs} for w, pairs in held.items()}
        return index


@dataclass
class SharedIndex:
    """The index that the router's jobs share (router/events.py, snapshots.py, membership.py,
    service.py), with the KV event stream entry it is current to. Hold ``lock`` to read or change
    ``index`` or ``cursor``: a snapshot load replaces both."""

    index: RadixIndex
    cursor: str = "0-0"  # the last KV event applied
    num_events_applied: int = 0
    events_since_snapshot: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
