"""Draft-model proposals: a smaller (or quantized) model sharing the target's tokenizer guesses k
tokens, one cheap step each, and the target checks them in one step.

Where the draft keeps its K/V:
- A copy of the target (the target's own checkpoint, e.g. quantized), whose K/V has the target's
  shape, shares the target's pool (QSpec's one cache for a low-precision draft and its verifier).
  It reads the K/V the target computed for every verified token, so it never prefills a prompt or
  catches up: its k steps are one row each. It writes the K/V of those rows into the target's own
  blocks at the positions the verify step computes next, which overwrites them with the target's;
  room for those 1 + k positions is allocated in the target's table first (vLLM's scheduler
  allocates such lookahead slots for its drafts), and a request for which it does not fit, or
  whose block there is shared, gets no draft.
- Any other draft keeps its own paged pool, with the same BlockManager and ModelRunner code as the
  target (prefix caching off: its blocks hold unverified drafts, which must never be shared). Each
  request the target runs has a shadow Request there whose tokens are the target's plus the drafts
  of the last step. Before proposing, the shadow is cut back to where it agrees with the target
  (its computed tokens with it: the K/V of rejected drafts is simply overwritten), and the target's
  new tokens are appended; one draft step then computes them all, and k - 1 single-token steps
  follow, batched across requests. Shadows of requests no longer running are freed.
"""
from __future__ import annotations

import numpy as np
import torch

from inferlab.block_manager import BlockManager
from inferlab.distributions import draw, probabilities
from inferlab.kv_pool import pool_shape
from inferlab.model.layers.quant import describe_weights
from inferlab.model.loader import load_model
from inferlab.request import Request
from inferlab.runner import ModelRunner, StepBatch
from inferlab.sampler import apply_logit_bias, argmax_rows
from inferlab.spec_decode.config import SpeculativeConfig
from inferlab.spec_decode.proposer import Draft, Proposer


class DraftModelProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, vocab_size: int, dtype: torch.dtype, device: torch.device,
                 num_blocks: int, block_size: int, native: bool = True, fused: bool = True, loaded=None,
                 target: tuple[BlockManager, ModelRunner] | None = None, tokenizer=None) -> None:
        """`loaded`: an already loaded (model, tokenizer) to draft with, instead of `config.model`;
        `target`: the target's block manager and runner, whose pool the draft shares (see above);
        `tokenizer`: the target's, which the draft's must equal token for token."""
        path = None if config.model == "embedded" else config.model  # the embedded GGUF, as EngineConfig(model=None)
        self.model, own_tokenizer = loaded or load_model(path, str(dtype).removeprefix("torch."), device,
                                                         config.quantization, config.int8_activations)
        if self.model.args.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.args.vocab_size} tokens) differs from "
                             f"the target's ({vocab_size}); a draft must share the target's tokenizer")
        if tokenizer is not None and own_tokenizer is not tokenizer:  # the same size, yet other tokens
            ids = range(min(own_tokenizer.vocab_size, tokenizer.vocab_size))
            i = next((i for i in ids if own_tokenizer.id_to_token(i) != tokenizer.id_to_token(i)), None)
            if i is not None:
                raise ValueError(f"the draft model's token {i} is {own_tokenizer.id_to_token(i)!r}, the target's "
                                 f"{tokenizer.id_to_token(i)!r}; a draft must share the target's tokenizer")
        own = (pool_shape(self.model.args, num_blocks, block_size), self.model.dtype)
        if target is not None and own != (tuple(target[1].kv_cache.shape), target[1].kv_cache.dtype):
            if config.share_kv:
                raise ValueError(f"share_kv needs a draft whose K/V has the target's shape and dtype: the draft's "
                                 f"is {own[0]} {own[1]}, the target's {tuple(target[1].kv_cache.shape)} "
                                 f"{target[1].kv_cache.dtype}")
            target = None  # not the target's shape after all: its own pool
        self.int8 = config.int8_activations
        self.target_blocks = target[0] if target is not None else None
        self.block_manager = None if target is not None else BlockManager(num_blocks, block_size,
                                                                         enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, num_blocks, block_size, set(), native, fused,
                                  kv_cache=target[1].kv_cache if target is not None else None)
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
        if self.target_blocks is not None:
            self._propose_shared(reqs, ks, tokens, probs)
        else:
            self._propose_own(reqs, ks, tokens, probs)
        return [Draft(t, torch.stack(p) if p else None) if t else None for t, p in zip(tokens, probs)]

    def _propose_shared(self, reqs: list[Request], ks: list[int], tokens: list[list[int]],
                        probs: list[list[torch.Tensor]]) -> None:
        bm, bs = self.target_blocks, self.runner.block_size
        active = [i for i, req in enumerate(reqs) if bm.allocate_slots(req, 1 + ks[i]) and
                  all(bm.blocks[b].ref_count == 1 for b in req.block_table[req.num_computed_tokens // bs:])]
        step = 0
        while active:  # row j of step s: token C + s of request j, C its computed tokens
            starts = np.array([reqs[i].num_computed_tokens + step for i in active], dtype=np.int64)
            ids = np.array([tokens[i][-1] if step else reqs[i].token_ids[-1] for i in active], dtype=np.int64)
            tables = np.zeros((len(active), int(starts.max()) // bs + 1), dtype=np.int32)
            for j, i in enumerate(active):
                n = int(starts[j]) // bs + 1
                tables[j, :n] = reqs[i].block_table[:n]
            ones = np.ones(len(active), dtype=np.int64)
            batch = StepBatch(counts=ones, starts=starts, sample=ones.astype(bool), ids=ids, tables=tables)
            self._pick(self.runner.run(batch), reqs, active, tokens, probs)
            step += 1
            active = [i for i in active if len(tokens[i]) < ks[i]]

    def _propose_own(self, reqs: list[Request], ks: list[int], tokens: list[list[int]],
                     probs: list[list[torch.Tensor]]) -> None:
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
            self._pick(self.runner.run(batch), reqs, active, tokens, probs)
            for sh, i in zip(shadows, active):
                sh.num_computed_tokens = sh.num_tokens
                sh.token_ids.append(tokens[i][-1])
            active = [i for i in active if len(tokens[i]) < ks[i]]

    @staticmethod
    def _pick(logits: torch.Tensor, reqs: list[Request], active: list[int], tokens: list[list[int]],
              probs: list[list[torch.Tensor]]) -> None:
        """Each active request's next draft token from its row of `logits`: the argmax when greedy,
        else drawn from q (kept: verification needs it). A request's logit_bias applies first, as
        verification applies it: a draft it bans would only be rejected."""
        biased = [j for j, i in enumerate(active) if reqs[i].params.logit_bias]
        if biased:
            logits = logits.float().clone()
            for j in biased:
                apply_logit_bias(logits[j], reqs[active[j]].params.logit_bias)
        greedy = [j for j, i in enumerate(active) if reqs[i].params.greedy]
        if greedy:
            for j, t in zip(greedy, argmax_rows(logits[torch.tensor(greedy)]).tolist()):
                tokens[active[j]].append(t)
        for j, i in enumerate(active):
            if not reqs[i].params.greedy:
                q = probabilities(logits[j:j + 1].float(), [reqs[i].params])[0]
                tokens[i].append(draw(q, reqs[i].generator))
                probs[i].append(q)

    def release(self, req: Request) -> None:
        sh = self.shadows.pop(req.request_id, None)
        self.synced.pop(req.request_id, None)
        if sh is not None:
            self.block_manager.free(sh)

    def forget_others(self, live: set[str]) -> None:
        for rid in [rid for rid in self.shadows if rid not in live]:
            self.release(self.shadows[rid])

    def check_integrity(self) -> None:
        if self.block_manager is not None:
            self.block_manager.check_integrity(self.shadows.values())

    def snapshot(self) -> dict:
        return {"draft_kv": self.block_manager.snapshot()} if self.block_manager is not None else {}

    def describe(self) -> str:
        bm = self.block_manager
        kv = "the target's K/V" if bm is None else f"its own pool of {bm.num_blocks} blocks"
        return f"a draft model, weights {describe_weights(self.model)}, int8 activations " \
               f"{'on' if self.int8 else 'off'}, {kv}"
