"""Structured outputs: a request's text held to a JSON schema, a regular expression, a list of
choices or a grammar, as vLLM's `SamplingParams(structured_outputs=...)`, OpenAI's `response_format`
and Ollama's `format` ask. Each step the request's guide masks the tokens its grammar cannot take
next (sampler.py), then takes in the token sampled; the request ends when the grammar is complete.
The grammar engine is llguidance (vLLM's `guidance` backend, and llama.cpp's option): an Earley
parser walked over a trie of the vocabulary, a mask in microseconds."""
from inferlab.structured.guide import Grammars, Guide
from inferlab.structured.params import StructuredOutputsParams

__all__ = ["Grammars", "Guide", "StructuredOutputsParams"]
