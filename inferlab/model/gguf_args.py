"""The model shape a GGUF file's metadata gives (its keys prefixed by the architecture), as the
fields of `ModelArgs`, and its RoPE scaling as an HF `rope_scaling` dict."""
from __future__ import annotations

from inferlab.model.base import ModelLoadError


def gguf_shape(arch: str, fields: dict, tensor_names: set[str]) -> dict:
    """The ModelArgs fields every GGUF file gives (keys prefixed by its architecture)."""
    hidden, heads = fields[f"{arch}.embedding_length"], _per_model(fields, f"{arch}.attention.head_count")
    head_dim = fields.get(f"{arch}.attention.key_length")
    if head_dim is None:  # then the heads split the hidden size
        if not isinstance(heads, int) or heads < 1 or not isinstance(hidden, int) or hidden % heads:
            raise ModelLoadError(f"{arch}.attention.head_count {heads!r} does not divide embedding_length "
                                 f"{hidden!r} (and the file gives no key_length)")
        head_dim = hidden // heads
    return dict(
        hidden_size=hidden, num_layers=fields[f"{arch}.block_count"], num_heads=heads,
        num_kv_heads=_per_model(fields, f"{arch}.attention.head_count_kv", heads), head_dim=head_dim,
        intermediate_size=fields.get(f"{arch}.feed_forward_length", 0),
        vocab_size=fields.get(f"{arch}.vocab_size", len(fields["tokenizer.ggml.tokens"])),
        max_position=fields.get(f"{arch}.context_length", 2048),
        rope_theta=fields.get(f"{arch}.rope.freq_base", 10000.0), rope_scaling=gguf_rope_scaling(arch, fields),
        rms_norm_eps=fields[f"{arch}.attention.layer_norm_rms_epsilon"],
        tie_word_embeddings="output.weight" not in tensor_names)


def _per_model(fields: dict, key: str, default=None):
    """A field GGUF may also write per layer (an array): its one value, where every layer has it."""
    value = fields.get(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{key} differs between layers ({sorted(set(value))}): not supported")
        value = value[0]
    return value


def gguf_rope_scaling(arch: str, fields: dict) -> dict | None:
    """llama.cpp's rope.scaling.* keys as an HF rope_scaling dict."""
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    key = f"{arch}.rope.scaling."
    scaling = {"rope_type": kind, "factor": fields.get(key + "factor", 1.0)}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = fields.get(key + "original_context_length",
                                                                 fields.get(f"{arch}.context_length"))
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                             ("attention_factor", "yarn_attn_factor")):
            if key + theirs in fields:
                scaling[ours] = fields[key + theirs]
        if key + "yarn_log_multiplier" in fields:  # DeepSeek's mscale_all_dim, stored times 0.1
            scaling["mscale"] = scaling["mscale_all_dim"] = fields[key + "yarn_log_multiplier"] / 0.1
    return scaling
