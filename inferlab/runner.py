"""ModelRunner: owns the KV pool tensor (sized and allocated by `kv_pool`), turns a scheduled batch
into model inputs, runs the model and samples. It knows nothing of queues or policies."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from inferlab import kernels
from inferlab.kv_pool import allocate_zeroed, pool_shape
from inferlab.model.base import CausalLM
from inferlab.model.layers import AttentionMetadata, NativeRows, PrefillSeq
from inferlab.model.layers.attention import prefill_kernel_runs
from inferlab.pooling import add_rows, mean_spans
from inferlab.prompt_logprobs import score, score_rows, score_spans
from inferlab.request import Request
from inferlab.sampler import SampleResult, sample
from inferlab.spec_decode.rejection import sample_rows
from inferlab.tape import DecodeTape

# The row kernel scores each query row on its own, so a long chunk over a cached prefix re-reads the
# prefix once per row; past ~16 rows gathering the prefix once (the prefill kernel, or SDPA) is
# faster (measured on one core: 32 rows over 600 keys, 1.2 ms vs 0.5 ms; 8 rows, 0.3 ms vs 0.7 ms).
NATIVE_MAX_CHUNK = 16


@dataclass
class StepBatch:
    """A step's scheduled tokens as flat arrays: everything a model rank needs to run the step,
    built once by the process that holds the requests (and sent as is to tensor-parallel ranks)."""

    counts: np.ndarray  # [S] int64 tokens each sequence computes this step
    starts: np.ndarray  # [S] int64 tokens it had computed before (its first new position)
    sample: np.ndarray  # [S] bool: this step reaches its last token, so a new token is due
    ids: np.ndarray  # [T] int64 the new tokens, sequence after sequence
    tables: np.ndarray  # [S, W] int32 block tables covering each sequence's tokens, padded with block 0
    # [S] int64 draft tokens ending each sequence's chunk (speculative decoding): a sequence with
    # sample set gets logits at its last 1 + spec rows; None when no sequence has any
    spec: np.ndarray | None = None
    # [S] int64 prompt tokens of each sequence (rows before that position read attention as prompt
    # rows); None: every row is a generated token's
    prompt_lens: np.ndarray | None = None
    # [S, 2] int64 the positions [lo, hi) whose rows each sequence's prompt logprobs score this step
    # (prompt_logprobs.py); None when no sequence scores any
    score: np.ndarray | None = None
    # whether a sequence pools its last prompt row (an embedding request): `run` then keeps `hidden`
    pools: bool = False
    # the final hidden states of the rows that get logits, kept by `run` when a sequence pools
    hidden: torch.Tensor | None = None
    # [S, 2] the prompt positions [lo, hi) each mean-pooled sequence adds this step (pooling.py);
    # their rows (by `prepare`) and final states (by `run`), which get no logits
    mean: np.ndarray | None = None
    mean_rows: list[int] = field(default_factory=list)
    pooled_rows: torch.Tensor | None = None

    @classmethod
    def of(cls, scheduled: list[tuple[Request, int]], block_size: int) -> StepBatch:
        counts = np.array([n for _, n in scheduled], dtype=np.int64)
        starts = np.array([r.num_computed_tokens for r, _ in scheduled], dtype=np.int64)
        ends = starts + counts
        ids = np.empty(int(counts.sum()), dtype=np.int64)
        num_blocks = -(-ends // block_size)
        tables = np.zeros((len(scheduled), int(num_blocks.max())), dtype=np.int32)
        spec = np.array([len(r.spec_token_ids) for r, _ in scheduled], dtype=np.int64)
        row = 0
        for i, (req, n) in enumerate(scheduled):
            if req.spec_token_ids:  # its chunk ends with drafts, which are not in token_ids yet
                ids[row:row + n - spec[i]] = req.token_ids[starts[i]:ends[i] - spec[i]]
                ids[row + n - spec[i]:row + n] = req.spec_token_ids
            else:
                ids[row:row + n] = req.token_ids[starts[i]:ends[i]]
            tables[i, :num_blocks[i]] = req.block_table[:num_blocks[i]]
            row += n
        return cls(counts, starts, ends - spec == np.array([r.num_tokens for r, _ in scheduled]), ids, tables,
                   spec if spec.any() else None, np.array([r.num_prompt_tokens for r, _ in scheduled], dtype=np.int64),
                   score_spans(scheduled), any(r.pooling is not None for r, _ in scheduled), mean=mean_spans(scheduled))

    def logit_widths(self) -> np.ndarray:
        """Rows of logits each sequence with `sample` set gets: 1, or 1 + its drafts."""
        return 1 + self.spec[self.sample] if self.spec is not None else np.ones(int(self.sample.sum()), np.int64)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, eos_ids: set[int],
                 native: bool = True, fused: bool = True, tp_size: int = 1,
                 kv_cache: torch.Tensor | None = None, prefault: bool = False) -> None:
        """native=False keeps attention on the PyTorch reference path even where the kernels run;
        fused=False runs every step through the Python model, op by op (no tape); tp_size: the
        model is one rank's shard of that many, and so is the pool (its share of the KV heads);
        kv_cache: another runner's pool to read and write instead of a new one (a draft model that
        shares its target's K/V), of the shape this model's pool would have; prefault: touch the new
        pool's pages now (`allocate_zeroed`)."""
        args = model.args
        self.model = model
        self.block_size = block_size
        self.eos_ids = eos_ids
        self.device, dtype = model.device, model.dtype
        shape = pool_shape(args, num_blocks, block_size, tp_size)
        if kv_cache is not None and (tuple(kv_cache.shape) != shape or kv_cache.dtype != dtype):
            raise ValueError(f"a shared KV pool must be {shape} {dtype}, got {tuple(kv_cache.shape)} {kv_cache.dtype}")
        self.kv_cache = kv_cache if kv_cache is not None else allocate_zeroed(shape, dtype, self.device, prefault)
        heads, kv_heads = args.num_heads // tp_size, args.num_kv_heads // tp_size
        self.kv_caches = [tuple(self.kv_cache[:, i]) for i in range(args.num_layers)]
        # why the native kernels do not run this model (None: they do), for attention_backend "native"'s error
        self.native_refusal = (f"the model is on {self.device.type}, and they are CPU code" if self.device.type != "cpu"
                               else f"they take float32 or bfloat16, not {dtype}" if dtype not in kernels.DTYPE_CODES
                               else kernels.attention_refusal(heads, kv_heads, args.head_dim))
        self.native = kernels.native() if native and self.native_refusal is None else None
        if native and self.native is None and self.native_refusal is None:
            self.native_refusal = "they are unavailable (the log says why: no C compiler, INFERLAB_NATIVE=0, ...)"
        # prompt rows go to a matrix-product kernel where this CPU has one for a K/V pool (MLA's latent
        # pool is attended by its own layer, which takes long chunks up-projected and rows absorbed)
        self.tile_prefill = self.native is not None and shape[0] == 2 and prefill_kernel_runs(
            self.native, dtype, heads, kv_heads, args.head_dim, block_size)
        # decode steps replayed from a tape of the model's forward (same kernels, no Python between them)
        self.tape = self.record_tape() if fused and self.native is not None else None
        # called with each batch before it runs, when set: calibration records the shapes it times
        self.on_execute: Callable[[list[tuple[Request, int]]], None] | None = None

    def record_tape(self) -> DecodeTape | None:
        return DecodeTape.record(self.model, self.kv_caches, self.native, kernels.C["IL_MAX_ROWS"])

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The K/V of these pool blocks on the host, block k at index k of dim 0 (preemption by swap)."""
        return self.kv_cache[:, :, block_ids].movedim(2, 0).cpu()

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Put blocks read by `read_blocks` back, into these pool blocks."""
        self.kv_cache[:, :, block_ids] = blocks.to(self.device).movedim(0, 2)

    def prepare(self, batch: StepBatch):
        """Flat model inputs and attention metadata for one step, built with numpy (no per-token
        Python loops): token ids, positions, the slot of each new token, and block tables."""
        bs, dev = self.block_size, self.device
        counts, starts, ids, tables = batch.counts, batch.starts, batch.ids, batch.tables
        row_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        ends = starts + counts
        num_seqs, total = len(counts), len(ids)
        num_blocks = -(-ends // bs)
        seq_of_row = np.repeat(np.arange(num_seqs), counts)
        positions = np.arange(total) - row_starts[seq_of_row] + starts[seq_of_row]
        slots = tables[seq_of_row, positions // bs].astype(np.int64) * bs + positions % bs
        last = (row_starts + counts - 1)[batch.sample]
        if batch.spec is None:
            sample_rows = last.tolist()
        else:  # a verified sequence: the rows of its last real token and of each draft
            widths = batch.logit_widths()
            sample_rows = np.concatenate([np.arange(e - w + 1, e + 1) for e, w in zip(last, widths)]).tolist()
        if batch.score is not None:  # and after them, the prompt rows scored (their logits follow the sampled ones)
            sample_rows += score_rows(batch.score, starts, row_starts)
        if batch.mean is not None:
            batch.mean_rows = score_rows(batch.mean, starts, row_starts)

        def seq_table(i: int) -> torch.Tensor:
            return torch.from_numpy(tables[i, :num_blocks[i]]).to(dev)

        meta = AttentionMetadata(torch.from_numpy(slots).to(dev), [])
        if self.tile_prefill:
            meta.native = self.native_rows(batch, row_starts, seq_of_row, positions)
        elif self.native is not None:  # decodes and short chunks over a prefix by the kernel, the rest by SDPA
            chunk = (starts == 0) | (counts > NATIVE_MAX_CHUNK)
            rows = np.flatnonzero(~chunk[seq_of_row])
            meta.native = NativeRows(torch.from_numpy(rows), torch.from_numpy(seq_of_row[rows].astype(np.int32)),
                                     torch.from_numpy((positions[rows] + 1).astype(np.int32)), torch.from_numpy(tables))
            meta.prefills = [PrefillSeq(int(row_starts[i]), int(counts[i]), int(ends[i]), seq_table(i))
                             for i in np.flatnonzero(chunk)]
        else:
            decode = counts == 1
            meta.prefills = [PrefillSeq(int(row_starts[i]), int(counts[i]), int(ends[i]), seq_table(i))
                             for i in np.flatnonzero(~decode)]
            if decode.any():
                meta.decode_rows = torch.from_numpy(row_starts[decode]).to(dev)
                meta.decode_block_tables = torch.from_numpy(tables[decode]).long().to(dev)
                meta.decode_context_lens = torch.from_numpy(ends[decode]).to(dev)
        return torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev), meta, sample_rows

    @staticmethod
    def native_rows(batch: StepBatch, row_starts: np.ndarray, seq_of_row: np.ndarray,
                    positions: np.ndarray) -> NativeRows:
        """Attention's plan where this CPU has a prefill kernel: a sequence's prompt rows go to it as
        one chunk, whether the prompt before them was cached or computed and however it was chunked,
        and its generated rows (decodes, drafts) to the row kernel, as in any decode step. Each kernel
        computes a row alone, in one order, so a prompt row's bits do not depend on the chunking or
        on cached blocks computed as prompt rows: a prompt read from the prefix cache answers as when
        first computed (cached blocks of generated tokens hold the row kernel's K/V, which a fresh
        prefill of the same tokens would compute otherwise). Many generated rows at once
        (recomputed after preemption) go to the prefill kernel too: the row kernel would re-read the
        prefix once per row."""
        counts, starts = batch.counts, batch.starts
        plen = batch.prompt_lens if batch.prompt_lens is not None else np.zeros_like(starts)
        prompt = np.clip(plen - starts, 0, counts)  # prompt rows of each sequence, which come first
        gen = counts - prompt
        many = gen > NATIVE_MAX_CHUNK
        in_chunk = prompt + np.where(many, gen, 0)  # rows of each sequence the prefill kernel takes
        rows = np.flatnonzero(positions - starts[seq_of_row] >= in_chunk[seq_of_row])
        # a sequence's prompt chunk, then (when many) its generated rows as a second chunk
        c = np.concatenate([np.flatnonzero(prompt), np.flatnonzero(many)])
        first = np.concatenate([row_starts[prompt > 0], (row_starts + prompt)[many]])
        num = np.concatenate([prompt[prompt > 0], gen[many]])
        keys = np.concatenate([(starts + prompt)[prompt > 0], (starts + counts)[many]])
        chunks = None
        if c.size:
            chunks = (torch.from_numpy(first), torch.from_numpy(num.astype(np.int32)),
                      torch.from_numpy(keys.astype(np.int32)), torch.from_numpy(c.astype(np.int32)))
        return NativeRows(torch.from_numpy(rows), torch.from_numpy(seq_of_row[rows].astype(np.int32)),
                          torch.from_numpy((positions[rows] + 1).astype(np.int32)), torch.from_numpy(batch.tables),
                          chunks)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> dict[str, list[SampleResult]]:
        if self.on_execute is not None:
            self.on_execute(scheduled)
        batch = StepBatch.of(scheduled, self.block_size)
        return self.sample(scheduled, batch, self.run(batch))

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """The model on one step: logits of the rows where a token is due, then of the prompt rows
        scored (None if there are none, or on a tensor-parallel rank other than 0)."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        rows = sample_rows + batch.mean_rows  # mean-pooled rows last: their states, without logits
        keep = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.tape is not None and not self.tape.current():  # a parameter's data was replaced
            self.tape = self.record_tape()
        if self.tape is not None and self.tape.covers(meta, input_ids.numel()):
            hidden = self.tape(input_ids, positions, meta)[keep]
        else:  # only the sampled rows go on past the last layer's attention (with none: all, unused)
            hidden = self.model(input_ids, positions, self.kv_caches, meta, keep if rows else None)
        if batch.mean_rows:
            batch.pooled_rows, hidden = hidden[len(sample_rows):], hidden[:len(sample_rows)]
        if batch.pools:
            batch.hidden = hidden
        return self.model.compute_logits(hidden) if sample_rows else None

    @torch.inference_mode()
    def sample(self, scheduled: list[tuple[Request, int]], batch: StepBatch,
               logits: torch.Tensor | None) -> dict[str, list[SampleResult]]:
        """The tokens each request emits: one, or with drafts those accepted plus one; and the prompt
        positions scored this step, into their requests (prompt_logprobs.py)."""
        if batch.pooled_rows is not None:
            add_rows(scheduled, batch.mean, batch.pooled_rows)
        if logits is None:
            return {}
        sampled = int(batch.logit_widths().sum())
        if batch.score is not None:
            score(scheduled, batch.score, logits[sampled:])
            logits = logits[:sampled]
        if not sampled:
            return {}
        reqs = [scheduled[i][0] for i in np.flatnonzero(batch.sample)]
        if batch.spec is None:
            results = [[res] for res in sample(logits, reqs, self.eos_ids)]
        else:
            results = sample_rows(logits, reqs, batch.logit_widths(), self.eos_ids)
        if batch.hidden is not None:  # a pooling request's vector: from the row of its last prompt token
            for r, res, row in zip(reqs, results, np.cumsum(batch.logit_widths()) - 1):
                if r.pooling is not None:
                    state = batch.hidden[row] if r.pooled is None else r.pooled / r.num_prompt_tokens
                    res[0].embedding = r.pooling.pool(state, self.model.classifier)
        return {r.request_id: res for r, res in zip(reqs, results)}

    def check_health(self) -> None:
        """Nothing can fail between steps in this process (the interface a tensor-parallel executor
        shares, whose workers can)."""

    def shutdown(self) -> None:
        """Nothing to stop in this process (the interface a tensor-parallel executor shares)."""
