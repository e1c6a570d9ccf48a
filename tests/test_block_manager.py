"""Block manager: ref counts, prefix caching by hash chain, LRU eviction, integrity checks."""
from __future__ import annotations

import pytest

import inferlab.block_manager as bm_mod
from inferlab.block_hash import block_hash, extra_keys
from inferlab.block_manager import BlockManager
from inferlab.request import Request
from inferlab.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), arrival_time=0.0)


def admit(bm: BlockManager, r: Request) -> int:
    """Admit like the scheduler does: take cached prefix blocks, allocate the rest, compute all."""
    hits = bm.get_computed_blocks(r)
    r.num_computed_tokens = 0
    assert bm.allocate_slots(r, r.num_tokens - len(hits) * bm.block_size, hits)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)
    return len(hits)


def test_allocation_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a = req("a", list(range(10)))
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.check_integrity([a])
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []
    bm.check_integrity([])


def test_all_or_nothing_when_short_of_blocks():
    bm = BlockManager(2, 4)
    a = req("a", list(range(12)))
    assert not bm.allocate_slots(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_is_reused_and_ref_counted():
    bm = BlockManager(16, 4)
    a = req("a", list(range(13)))
    admit(bm, a)
    b = req("b", list(range(12)) + [99, 100])
    assert admit(bm, b) == 3  # three full blocks shared
    assert b.block_table[:3] == a.block_table[:3]
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:3])
    assert bm.prefix_hits == 12 and bm.prefix_queries == 13 + 14
    bm.check_integrity([a, b])
    bm.free(a)
    assert all(bm.blocks[x].ref_count == 1 for x in b.block_table[:3])
    bm.free(b)
    bm.check_integrity([])


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(16, 4)
    admit(bm, req("a", list(range(8))))
    b = req("b", list(range(8)))
    assert len(bm.get_computed_blocks(b)) == 1  # 8 tokens = 2 full blocks, but the last must be computed


def test_hash_chain_depends_on_the_whole_prefix():
    bm = BlockManager(16, 4)
    admit(bm, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # same second block, different first block: no hit at all
    assert bm.get_computed_blocks(req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(6, 2)
    a = req("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)
    assert bm.snapshot(detail=True)["cached_free"] == 2
    b = req("b", [1, 2, 3, 4, 9])
    assert admit(bm, b) == 2  # reused after free
    bm.free(b)
    bm.check_integrity([])


@pytest.mark.parametrize("reuse_first", [False, True])
def test_eviction_takes_the_least_recently_freed_cached_blocks(reuse_first):
    """Two cached prefixes, freed one after the other; new work needing room evicts the older one's
    blocks (its tail first) and keeps the newer. Using the older prefix again makes it the newer."""
    bm = BlockManager(8, 2)
    first, second = req("first", [1, 2, 3, 4, 5]), req("second", [11, 12, 13, 14, 15])
    admit(bm, first)
    admit(bm, second)
    bm.free(first)
    bm.free(second)
    if reuse_first:
        again = req("again", [1, 2, 3, 4, 6])
        assert admit(bm, again) == 2
        bm.free(again)
    older, newer = ([11, 12, 13, 14, 15], [1, 2, 3, 4, 5]) if reuse_first else ([1, 2, 3, 4, 5], [11, 12, 13, 14, 15])
    older_blocks = bm.get_computed_blocks(req("probe", older))
    newer_blocks = bm.get_computed_blocks(req("probe", newer))
    assert len(older_blocks) == len(newer_blocks) == 2
    evicted: list[int] = []
    for n in range(1, 3):  # the 4 uncached free blocks go first, then one cached block at a time
        c = req(f"c{n}", list(range(100, 100 + 2 * (4 + n))))
        assert bm.allocate_slots(c, c.num_tokens)
        evicted.append(c.block_table[-1])
        assert bm.evictions == n
        bm.free(c)
    assert evicted == older_blocks[::-1]  # the older prefix's tail, then its head
    assert bm.get_computed_blocks(req("probe", older)) == []
    assert bm.get_computed_blocks(req("probe", newer)) == newer_blocks
    bm.check_integrity([])


def test_eviction_order_prefers_uncached_then_oldest():
    bm = BlockManager(4, 2)
    a = req("a", [1, 2, 3])  # one full cached block + one partial
    admit(bm, a)
    full, partial = a.block_table
    bm.free(a)
    d = req("d", [7])
    admit(bm, d)
    assert d.block_table == [partial]  # the uncached block is reused first, the cached one kept
    assert bm.blocks[full].hash is not None


def test_hash_collision_is_caught_by_token_comparison(monkeypatch):
    monkeypatch.setattr(bm_mod, "block_hash", lambda parent, tokens, extra=b"": b"42")  # every block collides
    bm = BlockManager(8, 2)
    admit(bm, req("a", [1, 2, 3]))
    assert bm.get_computed_blocks(req("b", [5, 6, 7])) == []  # same key, other tokens: no hit
    assert len(bm.get_computed_blocks(req("c", [1, 2, 3]))) == 1


def colliding_64_bits(monkeypatch) -> None:
    """Keys cut to 64 bits that ignore the parent and the extra keys: any two blocks of equal
    tokens collide whatever precedes them, the worst a forged prompt could achieve."""
    real = bm_mod.block_hash
    monkeypatch.setattr(bm_mod, "block_hash", lambda parent, tokens, extra=b"": real(None, tokens)[:8])


def test_equal_tokens_under_another_prefix_are_never_served_even_when_keys_collide(monkeypatch):
    colliding_64_bits(monkeypatch)
    bm = BlockManager(16, 2)
    victim = req("victim", [7, 7, 1, 2, 3])  # a private first block, then [1, 2]
    admit(bm, victim)
    own = req("own", [9, 9, 5])  # the attacker's own first block, cached
    admit(bm, own)
    forged = req("forged", [9, 9, 1, 2, 3])  # [1, 2] again, under the attacker's first block
    hits = bm.get_computed_blocks(forged)
    assert hits == [own.block_table[0]]  # the attacker's block, never the victim's [1, 2]
    assert victim.block_table[1] not in hits
    assert admit(bm, forged) == 1
    bm.check_integrity([victim, own, forged])


def salted(rid: str, tokens: list[int], salt: str | None) -> Request:
    r = req(rid, tokens)
    r.cache_salt = salt
    return r


def test_cache_salt_shares_only_within_a_salt():
    bm = BlockManager(16, 2, model="m")
    admit(bm, salted("a", [1, 2, 3, 4, 5], None))
    b = salted("b", [1, 2, 3, 4, 5], "tenant-b")
    assert bm.get_computed_blocks(b) == []
    admit(bm, b)
    assert bm.get_computed_blocks(salted("c", [1, 2, 3, 4, 5], "tenant-b")) == b.block_table[:2]
    assert bm.get_computed_blocks(salted("d", [1, 2, 3, 4, 5], "tenant-d")) == []


def test_cache_salt_separates_equal_prompts_even_when_keys_collide(monkeypatch):
    colliding_64_bits(monkeypatch)
    bm = BlockManager(16, 2, model="m")
    admit(bm, salted("a", [1, 2, 3, 4, 5], None))
    assert bm.get_computed_blocks(salted("b", [1, 2, 3, 4, 5], "tenant-b")) == []


def test_block_key_is_sha256_of_the_documented_bytes():
    """Other engines (a KV connector) recompute this key: its bytes must not drift."""
    import hashlib
    import struct
    parent = hashlib.sha256(b"parent").digest()
    extra = extra_keys("SmolLM2-135M-Instruct:bfloat16", None, "salt")
    assert extra == b'["SmolLM2-135M-Instruct:bfloat16",null,"salt"]'
    expected = hashlib.sha256(parent + struct.pack("<I3q", 3, 1, 70000, 2) + extra).digest()
    assert block_hash(parent, [1, 70000, 2], extra) == expected
    first = hashlib.sha256(bytes(32) + struct.pack("<I2q", 2, 5, 6)).digest()
    assert block_hash(None, (5, 6)) == first and len(first) == 32
    assert block_hash(first, (5, 6)) != block_hash(parent, (5, 6))  # the parent is part of the key


def test_keys_name_the_model_and_chain_through_every_block():
    a, b = BlockManager(8, 2, model="x:float32"), BlockManager(8, 2, model="y:float32")
    ra, rb = req("a", [1, 2, 3, 4, 5]), req("b", [1, 2, 3, 4, 5])
    admit(a, ra)
    admit(b, rb)
    assert ra.block_hashes[0] == block_hash(None, (1, 2), extra_keys("x:float32"))
    assert ra.block_hashes[1] == block_hash(ra.block_hashes[0], (3, 4))
    assert not set(ra.block_hashes) & set(rb.block_hashes)  # another model: other keys, every block


def test_integrity_check_detects_corruption():
    bm = BlockManager(4, 2)
    a = req("a", [1, 2, 3])
    admit(bm, a)
    bm.blocks[a.block_table[0]].ref_count = 2
    with pytest.raises(AssertionError, match=r"\[2\]"):
        bm.check_integrity([a])
    bm.blocks[a.block_table[0]].ref_count = 1
    bm.free_queue[a.block_table[1]] = None
    with pytest.raises(AssertionError, match=r"\[1\]"):
        bm.check_integrity([a])


def test_prefix_caching_disabled_registers_nothing():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    admit(bm, req("a", [1, 2, 3, 4, 5]))
    assert bm.hash_to_block == {} and bm.get_computed_blocks(req("b", [1, 2, 3, 4, 5])) == []


def test_engine_takes_a_cache_salt_in_the_prompt(make_tiny_engine):
    engine = make_tiny_engine()
    ids = list(range(300, 320))

    def run(rid: str, prompt: dict) -> int:
        engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        return engine.block_manager.prefix_hits

    assert run("plain", {"prompt_token_ids": ids}) == 0
    assert run("salted", {"prompt_token_ids": ids, "cache_salt": "tenant"}) == 0  # not the plain one's blocks
    assert run("same-salt", {"prompt_token_ids": ids, "cache_salt": "tenant"}) == 16
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        engine.add_request("bad", {"prompt_token_ids": ids, "cache_salt": ""})
    # refused on arrival: hashed in the step, it failed every request the step held
    with pytest.raises(ValueError, match="cache_salt must be valid Unicode text"):
        engine.add_request("lone", {"prompt_token_ids": ids, "cache_salt": "\ud800"})
    assert run("after", {"prompt_token_ids": ids, "cache_salt": "tenant"}) == 32  # (a running count) 16 more hits
    engine.check_integrity()
