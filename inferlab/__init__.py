"""InferLab: a small, readable LLM inference engine (paged KV cache, prefix caching, continuous batching)."""
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.llm import LLM
from inferlab.logger import setup_logging
from inferlab.outputs import CompletionOutput, RequestOutput
from inferlab.sampling_params import SamplingParams

setup_logging()

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
