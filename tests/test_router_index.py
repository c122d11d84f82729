"""The router's radix index: insert, match, remove, clear, and a worker leaving."""

import pytest

from router.index import RadixIndex, block_keys

BS = 4


def blocks(*values):
    """Token ids for whole blocks, each block filled with one value."""
    return [v for value in values for v in [value] * BS]


def store_chain(index, worker, token_ids, prefix=""):
    """Stores a sequence as the engine would: one event, engine hashes of its own making."""
    n = len(token_ids) // BS
    hashes = [f"{worker}{prefix}-{i}".encode() for i in range(n)]
    index.store(worker, hashes, None, token_ids[: n * BS])
    return hashes


def content(index: RadixIndex):
    """An index's content, independent of insertion order."""
    nodes, held = index.state()
    return ({(key, parent, tokens, tuple(workers)) for key, parent, tokens, workers in nodes},
            {worker: set(pairs) for worker, pairs in held.items()})


def test_block_keys_are_chained_and_skip_partial_blocks():
    a = list(block_keys(blocks(1, 2) + [9], BS))
    b = list(block_keys(blocks(3, 2), BS))
    assert len(a) == 2
    # Same second block, different first block: different keys, since the hash is chained.
    assert a[1][1] == b[1][1] and a[1][0] != b[1][0]


def test_match_counts_leading_blocks_per_worker():
    index = RadixIndex(BS)
    store_chain(index, "w1", blocks(1, 2, 3))
    store_chain(index, "w2", blocks(1, 2))
    assert index.overlaps(blocks(1, 2, 3, 4)) == {"w1": 3, "w2": 2}
    assert index.overlaps(blocks(1, 5, 3)) == {"w1": 1, "w2": 1}
    assert index.overlaps(blocks(7, 2, 3)) == {}


def test_store_with_parent_continues_the_chain():
    index = RadixIndex(BS)
    first = store_chain(index, "w1", blocks(1))
    index.store("w1", [b"next"], first[-1], blocks(2))
    assert index.overlaps(blocks(1, 2)) == {"w1": 2}


def test_unknown_parent_is_not_indexed():
    index = RadixIndex(BS)
    assert index.store("w1", [b"x"], b"never-seen", blocks(2)) == 0
    assert index.num_blocks == 0


def test_wrong_token_count_is_ignored():
    index = RadixIndex(BS)
    assert index.store("w1", [b"x", b"y"], None, blocks(1)) == 0


def test_remove_applies_by_engine_hash_and_prunes():
    index = RadixIndex(BS)
    hashes = store_chain(index, "w1", blocks(1, 2, 3))
    assert index.remove("w1", [hashes[2]]) == 1
    assert index.overlaps(blocks(1, 2, 3)) == {"w1": 2}
    assert index.num_blocks == 2
    # Removing a middle block breaks the run even though a later block remains cached.
    index.remove("w1", [hashes[0]])
    assert index.overlaps(blocks(1, 2)) == {}


def test_remove_one_workers_copy_keeps_the_others():
    index = RadixIndex(BS)
    h1 = store_chain(index, "w1", blocks(1, 2))
    store_chain(index, "w2", blocks(1, 2))
    index.remove("w1", h1)
    assert index.overlaps(blocks(1, 2)) == {"w2": 2}


def test_clear_and_worker_removal():
    index = RadixIndex(BS)
    store_chain(index, "w1", blocks(1, 2))
    store_chain(index, "w2", blocks(1, 3))
    assert index.clear("w1") == 2
    assert index.overlaps(blocks(1, 2)) == {"w2": 1}
    assert index.workers() == {"w2"}
    assert index.clear("w2") == 2
    assert index.num_blocks == 0


def test_hash_collision_is_rechecked(monkeypatch):
    import router.index as mod

    monkeypatch.setattr(mod, "chain_hash", lambda parent, tokens: 42)
    index2 = RadixIndex(BS)
    store_chain(index2, "w1", blocks(1))
    # Another content with the same key: the token check refuses the false hit.
    assert index2.overlaps(blocks(2)) == {}
    assert index2.overlaps(blocks(1)) == {"w1": 1}


@pytest.mark.parametrize("num_blocks", [1, 7])
def test_prompt_blocks(num_blocks):
    assert RadixIndex(BS).num_prompt_blocks(blocks(*range(num_blocks)) + [1]) == num_blocks
