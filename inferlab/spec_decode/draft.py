"""Draft-model proposals: a smaller (or quantized) model sharing the target's tokenizer guesses k
tokens, one cheap step each, and the target checks them in one step.

The draft keeps its own K/V in its own paged pool, with the same BlockManager and ModelRunner code
as the target (prefix caching off: its blocks hold unverified drafts, which must never be shared).
Each request the target runs has a shadow Request here whose tokens are the target's plus the
drafts of the last step. Before proposing, the shadow is cut back to where it agrees with the
target (its computed tokens with it: the K/V of rejected drafts is simply overwritten), and the
target's new tokens are appended; one draft step then computes them all, and k - 1 single-token
steps follow, batched across requests. Shadows of requests no longer running are freed.
"""
from __future__ import annotations

import torch

from inferlab.block_manager import BlockManager
from inferlab.model.loader import load_model
from inferlab.request import Request
from inferlab.runner import ModelRunner, StepBatch
from inferlab.sampler import argmax_rows, draw, probabilities
from inferlab.spec_decode.config import SpeculativeConfig
from inferlab.spec_decode.proposer import Draft, Proposer


class DraftModelProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, vocab_size: int, dtype: torch.dtype, device: torch.device,
                 num_blocks: int, block_size: int, native: bool = True, fused: bool = True, loaded=None) -> None:
        """`loaded`: an already loaded (model, tokenizer) to draft with, instead of `config.model`."""
        path = None if config.model == "embedded" else config.model  # the embedded GGUF, as EngineConfig(model=None)
        self.model, _ = loaded or load_model(path, str(dtype).removeprefix("torch."), device,
                                             config.quantization, config.int8_activations)
        if self.model.args.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.args.vocab_size} tokens) differs from "
                             f"the target's ({vocab_size}); a draft must share the target's tokenizer")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, num_blocks, block_size, set(), native, fused)
        self.shadows: dict[str, Request] = {}
        self.synced: dict[str, int] = {}  # tokens known equal to the target's (they only ever grow)

    def _sync(self, req: Request) -> Request:
        """`req`'s shadow, cut back to where it agrees with `req` and extended with its new tokens."""
        sh = self.shadows.get(req.request_id)
        target = req.token_ids
        if sh is None:
            sh = self.shadows[req.request_id] = Request(req.request_id, list(target), req.params, 0.0)
        else:
            common, end = self.synced[req.request_id], min(len(sh.token_ids), len(target))
            while common < end and sh.token_ids[common] == target[common]:
                common += 1
            del sh.token_ids[common:]
            sh.token_ids.extend(target[common:])
            # at least the last token is computed again: its logits give the first draft (when the
            # target has not moved since the last drafts, the draft had computed that token already)
            sh.num_computed_tokens = min(sh.num_computed_tokens, common, len(target) - 1)
        self.synced[req.request_id] = len(target)
        return sh

    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft | None]:
        tokens: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        active = []
        for i, req in enumerate(reqs):
            sh = self._sync(req)
            # room for the tokens to catch up on and the k - 1 drafts computed after them
            if self.block_manager.allocate_slots(sh, sh.num_tokens - sh.num_computed_tokens + ks[i] - 1):
                active.append(i)
            else:  # the draft pool is full: this request decodes without drafts, and starts afresh later
                self.release(req)
        while active:
            shadows = [self.shadows[reqs[i].request_id] for i in active]
            batch = StepBatch.of([(sh, sh.num_tokens - sh.num_computed_tokens) for sh in shadows],
                                 self.block_manager.block_size)
            logits = self.runner.run(batch)
            greedy = [j for j, i in enumerate(active) if reqs[i].params.greedy]
            if greedy:
                picks = argmax_rows(logits[torch.tensor(greedy)]).tolist()
                for j, t in zip(greedy, picks):
                    tokens[active[j]].append(t)
            for j, i in enumerate(active):
                if not reqs[i].params.greedy:  # drawn from q, which verification needs
                    q = probabilities(logits[j:j + 1].float(), [reqs[i].params])[0]
                    tokens[i].append(draw(q, reqs[i].generator))
                    probs[i].append(q)
                shadows[j].num_computed_tokens = shadows[j].num_tokens
                shadows[j].token_ids.append(tokens[i][-1])
            active = [i for i in active if len(tokens[i]) < ks[i]]
        return [Draft(t, torch.stack(p) if p else None) if t else None for t, p in zip(tokens, probs)]

    def release(self, req: Request) -> None:
        sh = self.shadows.pop(req.request_id, None)
        self.synced.pop(req.request_id, None)
        if sh is not None:
            self.block_manager.free(sh)

    def forget_others(self, live: set[str]) -> None:
        for rid in [rid for rid in self.shadows if rid not in live]:
            self.release(self.shadows[rid])

    def check_integrity(self) -> None:
        self.block_manager.check_integrity(self.shadows.values())

    def snapshot(self) -> dict:
        return {"draft_kv": self.block_manager.snapshot()}

