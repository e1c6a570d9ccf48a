"""The radix-tree prefix cache: exact hits through the tree, subtree eviction, its invariants, and
the same hits as the hash chain whenever nothing is evicted."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_block_manager import admit, req

import inferlab.radix_cache as radix_mod
from inferlab.block_manager import BlockManager
from inferlab.radix_cache import Node, RadixBlockManager


def root(bm: RadixBlockManager) -> Node:
    """The tree of requests without a cache salt."""
    return bm.roots[bm.model_extra]


def test_shared_prefix_is_found_by_walking_the_tree():
    bm = RadixBlockManager(16, 4)
    a = req("a", list(range(13)))
    assert admit(bm, a) == 0
    assert [n.block_id for n in (root(bm).children[(0, 1, 2, 3)],)] == [a.block_table[0]]
    b = req("b", list(range(12)) + [99, 100])
    assert admit(bm, b) == 3
    assert b.block_table[:3] == a.block_table[:3]
    assert bm.prefix_hits == 12 and bm.prefix_queries == 13 + 14
    c = req("c", [0, 1, 2, 3, 9, 9, 9, 9, 7])  # branches after the first block
    assert admit(bm, c) == 1
    assert len(root(bm).children[(0, 1, 2, 3)].children) == 2
    bm.check_integrity([a, b, c])
    for r in (a, b, c):
        bm.free(r)
    bm.check_integrity([])


def test_a_block_is_only_reached_through_its_whole_prefix():
    bm = RadixBlockManager(16, 4)
    admit(bm, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert bm.get_computed_blocks(req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_colliding_names_never_give_a_wrong_block(monkeypatch):
    # every node gets the same name: the tree stops caching at the collision, but never confuses blocks
    monkeypatch.setattr(radix_mod, "block_hash", lambda parent, tokens, extra=b"": b"42")
    bm = RadixBlockManager(8, 2)
    admit(bm, req("a", [1, 2, 3, 4, 5]))
    assert bm.get_computed_blocks(req("b", [5, 6, 7])) == []
    assert len(bm.get_computed_blocks(req("c", [1, 2, 3]))) == 1


def test_node_names_are_the_hash_chains_keys():
    radix, chain = RadixBlockManager(16, 4), BlockManager(16, 4)
    a, b = req("a", list(range(10))), req("b", list(range(10)))
    admit(radix, a)
    admit(chain, b)
    assert a.block_hashes == b.block_hashes


def test_evicting_a_node_cuts_its_subtree():
    bm = RadixBlockManager(6, 2)
    a = req("a", [1, 2, 3, 4, 5, 6, 7])  # 3 full blocks in a chain, one partial
    admit(bm, a)
    head = a.block_table[0]
    bm.free(a)
    assert len(bm.nodes) == 3
    # reuse the head block first (it is freed last, so push it to the front by hand): its subtree goes too
    bm.free_queue.move_to_end(head, last=False)
    d = req("d", [9])
    admit(bm, d)
    assert d.block_table == [head]
    assert bm.nodes == {} and bm.roots == {} and bm.hash_to_block == {}
    assert bm.evictions == 3
    bm.check_integrity([d])


def test_a_request_whose_path_was_evicted_caches_its_own_blocks_again():
    bm = RadixBlockManager(8, 2)
    a = req("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    b = req("b", [1, 2, 3, 4, 5, 6, 7])  # computes its own copies (a's are registered already)
    b.num_computed_tokens = 0
    assert bm.allocate_slots(b, 4)
    b.num_computed_tokens = 4
    bm.cache_full_blocks(b)
    assert b.block_table[:2] != a.block_table[:2] and len(b.block_hashes) == 2  # duplicates, not registered
    bm.free(a)  # a's cached blocks are evicted: b's path is gone
    for block in [x for x in bm.free_queue if bm.blocks[x].hash is not None]:
        bm.free_queue.move_to_end(block, last=False)
    e = req("e", [8, 8, 8, 8, 8])
    admit(bm, e)
    assert (1, 2) not in root(bm).children and bm.evictions == 2
    assert bm.allocate_slots(b, 3)
    b.num_computed_tokens = 7
    bm.cache_full_blocks(b)
    assert [bm.nodes[h].block_id for h in b.block_hashes] == b.block_table[:3]
    bm.check_integrity([b, e])


def test_a_cache_salt_walks_its_own_tree():
    bm = RadixBlockManager(16, 2, model="m")
    admit(bm, req("a", [1, 2, 3, 4, 5]))
    salted = req("b", [1, 2, 3, 4, 5])
    salted.cache_salt = "tenant-b"
    assert admit(bm, salted) == 0
    again = req("c", [1, 2, 3, 4, 5])
    again.cache_salt = "tenant-b"
    assert bm.get_computed_blocks(again) == salted.block_table[:2]
    assert len(bm.roots) == 2


@pytest.mark.parametrize("corrupt, rule", [
    (lambda bm: setattr(root(bm).children[(1, 2)], "block_id", root(bm).children[(1, 2)].children[(3, 4)].block_id),
     "T1"),
    (lambda bm: setattr(root(bm).children[(1, 2)], "parent", None), "T2"),
    (lambda bm: bm.nodes.clear(), "T3"),
])
def test_tree_invariants_detect_corruption(corrupt, rule):
    bm = RadixBlockManager(8, 2)
    a = req("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.check_integrity([a])
    corrupt(bm)
    with pytest.raises(AssertionError, match=rf"\[{rule}\]"):
        bm.check_integrity([a])


ops = st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 2), min_size=1, max_size=14)), min_size=1,
               max_size=30)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(4, 40), block_size=st.sampled_from([1, 2, 3]))
def test_random_admits_and_frees_keep_the_tree_whole_and_match_the_hash_chain(ops, num_blocks, block_size):
    """Both managers see the same admits and frees. The tree's invariants hold throughout; while
    neither has evicted anything, both find exactly the same cached blocks."""
    managers = [RadixBlockManager(num_blocks, block_size), BlockManager(num_blocks, block_size)]
    live: list[list] = [[], []]
    for i, (free_one, tokens) in enumerate(ops):
        if free_one and live[0]:
            for bm, reqs in zip(managers, live):
                bm.free(reqs.pop(0))
        hits = []
        for bm, reqs in zip(managers, live):
            r = req(f"r{i}", tokens)
            found = bm.get_computed_blocks(r)
            hits.append(found)
            if bm.allocate_slots(r, len(tokens) - len(found) * block_size, found):
                r.num_computed_tokens = len(tokens)
                bm.cache_full_blocks(r)
                reqs.append(r)
            bm.check_integrity(reqs)
        if not any(bm.evictions for bm in managers):
            assert hits[0] == hits[1]
    for bm, reqs in zip(managers, live):
        for r in reqs:
            bm.free(r)
        bm.check_integrity([])
        assert bm.num_free_blocks == num_blocks
