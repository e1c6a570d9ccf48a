"""EngineConfig: the one dataclass of engine settings, validated with one-line `ValueError`s."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from inferlab.json_config import check_types, json_object
from inferlab.kv_transfer.config import KVTransferConfig
from inferlab.model.layers.keep import quantization_mode
from inferlab.policy import resolve_policy
from inferlab.pooling import POOLING_TYPES
from inferlab.spec_decode.config import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"float": "float32", "half": "float16"}  # vLLM's other names
ATTENTION_BACKENDS = ("auto", "native", "torch")
KV_ALLOCATIONS = ("paged", "reserve")
PREEMPTION_MODES = ("recompute", "swap")
PREFIX_CACHES = ("hash", "radix")
UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "b": 1}


def parse_size(text: str) -> int:
    """A size in bytes from text: 4294967296, 4e9, or with a unit (4GiB, 512MiB, 4GB); ValueError if none."""
    number, unit = text.strip(), 1
    for suffix, factor in UNITS.items():  # the two-letter ones before "b"
        if number.lower().endswith(suffix):
            number, unit = number[:-len(suffix)].strip(), factor
            break
    try:
        value = float(number) * unit
    except ValueError:
        value = float("nan")
    if not 0 <= value < 2**63:
        raise ValueError(f"expected a size in bytes (4e9, 4GiB, 512MiB), got {text!r}")
    return int(value)


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    dtype: str = "auto"  # activations and KV cache; weights follow `quantization`
    # auto: weights kept as the checkpoint stores them (a GGUF's quantized blocks, a safetensors' float
    # type) where the native CPU kernels run them, else converted to dtype (bf16 models on bf16 matrix
    # units: what those multiply fastest, `layers/keep.py: target_type`); none: converted to dtype at
    # load; q8_0 / q4_0 / q4_1: quantized at load (the vocabulary matrix to q8_0)
    quantization: str = "auto"
    # True: linear layers with integer block weights (q8_0, q4_0/1, q5_0/1, the K-quants, iq4_nl/xs:
    # `quant.INT8_TYPES`) quantize their inputs to int8 per 32 and multiply in integers, as llama.cpp
    # does: faster, but it moves the next-token distributions a little and can flip near-ties
    # (docs/performance.md has the KL figures)
    int8_activations: bool = False
    # vLLM's: fields laid over an HF folder's config.json (a dict or its JSON text), e.g. to load
    # Qwen3-Reranker as a classifier: {"architectures": ["Qwen3ForSequenceClassification"],
    # "classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": true}
    hf_overrides: dict | str | None = None
    # how embeddings pool the prompt's final states: "LAST" (its last token's) or "MEAN" (all its
    # tokens'); None: as the checkpoint says (a sentence-transformers Pooling module, a GGUF's
    # pooling_type), else LAST. vLLM's pooler_config pooling_type, llama.cpp's --pooling
    pooling_type: str | None = None
    device: str | None = None  # None: cuda if available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    kv_cache_memory: int | str | None = None  # bytes for the KV pool ("4GiB" too); None: a default for the device
    # True: touch every page of the KV pool at start, as vLLM and llama.cpp do: the memory is held from
    # then on and no request pays the first use of a page (about 1.3 ms a MB on some VMs), for a
    # longer start (the default of `inferlab serve` and `bench`). False: pages are taken as blocks are first used
    kv_cache_prefault: bool = False
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 256
    # Tokens a step may compute, or "auto": as many as keep a step near step_time_target (`budget.py`)
    max_num_batched_tokens: int | str = 2048
    step_time_target: float = 0.25  # seconds, for max_num_batched_tokens="auto"
    # Cap on one prefill's tokens per step, so a huge prompt cannot stall running decodes.
    long_prefill_token_threshold: int | None = None  # None: max_num_batched_tokens // 4 (auto: the budget)
    enable_prefix_caching: bool = True
    prefix_cache: str = "hash"  # the cache's structure: a hash chain (vLLM) or a radix tree (SGLang)
    # paged: blocks as tokens arrive (vLLM); reserve: a request's whole length up front, as engines
    # before vLLM did, and an out-of-KV-memory error for a request that does not fit (see allocation.py)
    kv_allocation: str = "paged"
    # what preemption does with the victim's KV: drop it and recompute later, or copy it to a host
    # pool of swap_space GiB and back (vLLM's names; see preemption.py)
    preemption_mode: str = "recompute"
    swap_space: float = 4.0
    scheduling_policy: str = "fcfs"  # fcfs, priority, sjf, module:Class, file.py:Class (or the class itself)
    sjf_aging_rate: float = 20.0  # tokens of work forgiven per second of waiting
    # auto: the native CPU kernel where it builds, else PyTorch; torch: always the PyTorch reference
    attention_backend: str = "auto"
    num_threads: int | None = None  # CPU threads for the model; None: the cores others leave free (threads.py)
    # True: every step runs the Python model op by op, where decode steps would otherwise replay a tape
    # of its forward pass in one native call (`tape.py`): for timing the two, or to rule the tape out
    # (vLLM's flag of the same name turns off CUDA graphs, for the same reasons)
    enforce_eager: bool = False
    # The seed of the requests that set none: each then draws its own from a generator seeded so, and
    # a run's sampled outputs repeat (vLLM's `seed`); None: fresh randomness each run
    seed: int | None = None
    # Tensor parallelism (`inferlab.distributed`): every layer and the KV pool split across this many
    # ranks (processes: one per GPU, or sharing a host's cores), on one host or `nnodes` hosts, which
    # meet at master_addr:master_port (default MASTER_ADDR / MASTER_PORT; a free port on one host).
    # The engine runs on node 0; the same command with node_rank 1.. runs the other hosts' ranks.
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # vLLM's --kv-transfer-config (a dict, its JSON text, or a KVTransferConfig): a KV connector that
    # loads prefixes from, and saves them to, a store shared by instances (`inferlab.kv_transfer`)
    kv_transfer_config: KVTransferConfig | dict | str | None = None
    # Speculative decoding (`inferlab.spec_decode`): vLLM's dict, its JSON, or a SpeculativeConfig;
    # None: off. {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4} or
    # {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}
    speculative_config: SpeculativeConfig | dict | str | None = None

    def _check_device(self) -> None:
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda (cuda:N for one GPU), got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: PyTorch sees no GPU here (a CPU-only build, or none "
                             "visible); use --device cpu")

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):  # vLLM takes torch.float16 as well as "float16"
            self.dtype = str(self.dtype).removeprefix("torch.")
        if isinstance(self.scheduling_policy, type):  # the class itself: by its name, as a config holds it
            self.scheduling_policy = f"{self.scheduling_policy.__module__}:{self.scheduling_policy.__qualname__}"
        check_types(self)
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if isinstance(self.kv_cache_memory, str):
            try:
                self.kv_cache_memory = parse_size(self.kv_cache_memory)
            except ValueError as e:
                raise ValueError(f"kv_cache_memory: {e}") from None
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self.quantization = quantization_mode(self.quantization)
        if self.hf_overrides is not None:
            self.hf_overrides = json_object(self.hf_overrides, "hf_overrides")
        if self.pooling_type is not None:
            self.pooling_type = self.pooling_type.upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size must be an integer in [1, 1024], got {self.block_size!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        auto = self.max_num_batched_tokens == "auto"
        if not auto and (not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1):
            raise ValueError(f"max_num_batched_tokens must be 'auto' or an integer >= 1, "
                             f"got {self.max_num_batched_tokens!r}")
        if not self.step_time_target > 0:
            raise ValueError(f"step_time_target must be > 0 seconds, got {self.step_time_target}")
        if self.long_prefill_token_threshold is None and not auto:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens // 4)
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be >= 1")
        resolve_policy(self.scheduling_policy)  # a one-line ValueError for an unknown or broken policy
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.device is not None:
            self._check_device()
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.prefix_cache not in PREFIX_CACHES:
            raise ValueError(f"prefix_cache must be one of {PREFIX_CACHES}, got {self.prefix_cache!r}")
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise ValueError(f"kv_allocation must be one of {KV_ALLOCATIONS}, got {self.kv_allocation!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if not 0 <= self.swap_space < 2**20:  # NaN and inf too
            raise ValueError(f"swap_space must be a number of GiB, >= 0 and finite, got {self.swap_space}")
        if not 0 <= self.sjf_aging_rate < float("inf"):  # nan and inf made every key nan: an order of no policy
            raise ValueError(f"sjf_aging_rate must be a finite number >= 0, got {self.sjf_aging_rate}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        if not isinstance(self.nnodes, int) or not 1 <= self.nnodes <= tp or tp % self.nnodes:
            raise ValueError(f"nnodes must divide tensor_parallel_size {tp} (the same number of ranks on each "
                             f"node), got {self.nnodes!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes {self.nnodes}), got {self.node_rank!r}")
        if tp > 1 and self.preemption_mode == "swap":
            raise ValueError("preemption_mode 'swap' needs tensor_parallel_size 1: each rank holds its own share "
                             "of the KV pool")
        if self.kv_transfer_config is not None:
            self.kv_transfer_config = KVTransferConfig.parse(self.kv_transfer_config)
            if tp > 1:
                raise ValueError("kv_transfer_config needs tensor_parallel_size 1: each rank holds its own share "
                                 "of the KV pool")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if tp > 1 and self.speculative_config is not None:
            raise ValueError("speculative_config needs tensor_parallel_size 1")
        if self.speculative_config is not None and self.kv_transfer_config is not None:
            raise ValueError("speculative_config and kv_transfer_config do not run together yet: a step's blocks "
                             "are saved before its drafts are verified")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}")
