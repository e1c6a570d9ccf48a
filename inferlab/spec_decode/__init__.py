"""Speculative decoding: propose a few next tokens cheaply, check them all in one target step.

| module         | job                                                                        |
|----------------|----------------------------------------------------------------------------|
| `config.py`    | SpeculativeConfig: vLLM's `speculative_config` dict, validated             |
| `proposer.py`  | the Proposer interface and a Draft                                         |
| `ngram.py`     | prompt lookup: the tokens that followed an earlier match of the suffix     |
| `draft.py`     | a small (or quantized) draft model with its own paged KV pool and runner   |
| `rejection.py` | exact rejection sampling of the drafts against the target's logits         |
| `speculator.py`| who speculates each step, the proposers by name, the acceptance counters    |
"""
