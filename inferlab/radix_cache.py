"""RadixBlockManager: the prefix cache as a radix tree (a trie) over token blocks, as in SGLang's
RadixAttention, behind the same interface as BlockManager's hash chain (`prefix_cache="radix"`).

Each node below the root is one full block: its edge label is the block's `block_size` token
ids, its value the pool block holding their K/V. A lookup walks down from the root one block of
the prompt at a time, following the child whose label equals those tokens. A hit is therefore
exact by construction: a block is only ever reached through its whole prefix. Where the hash
chain finds a block by a digest of its prefix, the trie finds it by the prefix itself.

A node is named by the key of its path (`block_hash`), so its block carries the same `hash` as it
would in the hash-chain mode and the rest of the pool (the LRU free queue, the dashboard's grid,
invariants 1-6) works unchanged. The name is never used to find a block. There is one root per
first-block extra keys (the model and a request's cache salt): requests with different salts walk
different trees.

Eviction stays LRU over the shared free queue (a request's tail blocks are freed first, so
leaves usually go first). Evicting a node drops its whole subtree from the tree, since a child
is only reachable through its parent: the blocks below lose their cache entry too, and those
still in use carry on uncached. SGLang also merges chains of single-child nodes into one edge
and matches token by token; here K/V lives in blocks, so a block is the natural edge.

Tree invariants (checked by `check_integrity`, after BlockManager's):
| #  | invariant                                                                          |
|----|------------------------------------------------------------------------------------|
| T1 | a node's block holds the node's label as token_ids and the node's name as hash     |
| T2 | a node is its parent's child under its label; its name is block_hash(parent's, label[, root's extra]) |
| T3 | the nodes reachable from the roots are exactly `nodes`, and their blocks exactly the cached ones |
"""
from __future__ import annotations

from collections.abc import Iterable

from inferlab.block_hash import block_hash
from inferlab.block_manager import Block, BlockManager
from inferlab.request import Request


class Node:
    __slots__ = ("name", "tokens", "block_id", "parent", "children", "extra")

    def __init__(self, name: bytes | None, tokens: tuple[int, ...], block_id: int, parent: Node | None,
                 extra: bytes = b"") -> None:
        self.name = name
        self.tokens = tokens
        self.block_id = block_id
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.extra = extra  # a root's: the extra keys of the first blocks below it

    def child_name(self, tokens: tuple[int, ...]) -> bytes:
        return block_hash(self.name, tokens, self.extra)


class RadixBlockManager(BlockManager):
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 model: str = "") -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching, model)
        self.roots: dict[bytes, Node] = {}  # first-block extra keys -> root, while it has children
        self.nodes: dict[bytes, Node] = {}  # name -> node, for every node below a root

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Walk down from the root while the next block of `req`'s tokens is a child's label. As
        with the hash chain, the last token is never taken from the cache."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, node = self.block_size, [], self.roots.get(self.first_block_extra(req))
        for i in range((req.num_tokens - 1) // bs if node is not None else 0):
            node = node.children.get(tuple(req.token_ids[i * bs:(i + 1) * bs]))
            if node is None:
                break
            hits.append(node.block_id)
        return hits

    def cache_full_blocks(self, req: Request) -> None:
        """Insert the blocks `req`'s computed tokens have filled below the path of those it already
        has. `req.block_hashes` lists the names of that path's nodes, so the walk resumes where it
        stopped; if a node of the path was evicted meanwhile, the path is walked again from the root,
        and `req`'s own blocks fill the places that are missing."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        node = self.nodes.get(req.block_hashes[-1]) if req.block_hashes else None
        if node is None and req.num_computed_tokens >= bs:  # a root only for a tree that gets a block
            extra = self.first_block_extra(req)
            node, req.block_hashes = self.roots.setdefault(extra, Node(None, (), -1, None, extra)), []
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            child = node.children.get(tokens)
            if child is None:
                block, name = self.blocks[req.block_table[i]], node.child_name(tokens)
                if block.hash is not None or name in self.nodes:  # cached under another path: stop caching here
                    return
                child = node.children[tokens] = self.nodes[name] = Node(name, tokens, block.block_id, node)
                block.hash, block.token_ids, block.parent, block.extra = name, tokens, node.name, node.extra
                self.hash_to_block[name] = block.block_id
            req.block_hashes.append(child.name)
            node = child

    def evict(self, block: Block) -> None:
        """Cut the block's node from the tree, with the subtree below it."""
        node = self.nodes[block.hash]
        del node.parent.children[node.tokens]
        if node.parent.parent is None and not node.parent.children:  # a root left empty
            del self.roots[node.parent.extra]
        stack = [node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            del self.nodes[node.name]
            super().evict(self.blocks[node.block_id])

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-free block (with, here, any used ones below it in the tree)."""
        evictions = self.evictions
        for block_id in list(self.free_queue):
            block = self.blocks[block_id]
            if block.hash is not None:  # else already cut with an ancestor
                self.evict(block)
        self.evictions = evictions  # a reset is not an eviction

    def check_integrity(self, live: Iterable[Request]) -> None:
        super().check_integrity(live)
        seen, stack = 0, list(self.roots.values())
        while stack:
            node = stack.pop()
            for tokens, child in node.children.items():
                block = self.blocks[child.block_id]
                if block.token_ids != tokens or block.hash != child.name:
                    raise AssertionError(f"[T1] node of block {child.block_id} disagrees with the block")
                if child.tokens != tokens or child.parent is not node or child.name != node.child_name(tokens):
                    raise AssertionError(f"[T2] node of block {child.block_id} is misplaced in the tree")
                if self.nodes.get(child.name) is not child:
                    raise AssertionError(f"[T3] node of block {child.block_id} is not listed")
                seen += 1
                stack.append(child)
        if seen != len(self.nodes) or seen != len(self.hash_to_block):
            raise AssertionError(f"[T3] {seen} nodes in the tree, {len(self.nodes)} listed, "
                                 f"{len(self.hash_to_block)} blocks cached")


PREFIX_CACHES: dict[str, type[BlockManager]] = {"hash": BlockManager, "radix": RadixBlockManager}
