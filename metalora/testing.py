"""Tiny random-init causal LMs and word-level tokenizers, built from configs (nothing downloaded).

One builder for the test suite and the benchmarks: ``tiny_model(family, seed, **overrides)`` seeds torch,
builds the family's config from ``TINY`` (2 layers, width 32, vocabulary ``VOCAB``) with ``overrides``
applied, and returns the model in eval mode; ``tiny_llama`` is its Llama case. ``word_tokenizer`` makes
a whitespace word-level tokenizer whose ids are known by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from metalora.adapters import adapter_parameters

VOCAB = 64
FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")
TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
"""The shape every tiny decoder shares (GPT-2 has its own names for the same sizes)."""


def tiny_config(family: str = "llama", **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``family`` (one of ``FAMILIES``), ``overrides`` applied last."""
    common = {**TINY, **overrides}
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**{"head_dim": 8, "sliding_window": 16, **common})
    if family == "gpt2":
        gpt2 = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
        dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(**{**gpt2, "bos_token_id": 0, "eos_token_id": 1, **dropout, **overrides})
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")


def tiny_model(
    family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A random-init model of ``tiny_config(family, **overrides)``, initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg.name_or_path = f"tiny-{family}"
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """``tiny_model("llama", ...)``: e.g. ``tiny_llama(vocab_size=len(tok), initializer_range=0.3)``."""
    return tiny_model("llama", seed, dtype, **overrides)


def randomize_adapter(model: torch.nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    """Give every adapter tensor random values, so checks don't pass only because B = 0 at init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def word_tokenizer(
    vocab: Sequence[str] | Mapping[str, int],
    *,
    split: str = "whitespace_split",
    **special: str,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``vocab`` words get ids in order (or the mapping's ids); ``special`` names the
    special tokens (``pad_token="<pad>"``, ``eos_token=...``, ``unk_token=...``, ``bos_token=...``).
    ``split``: ``whitespace_split`` (split on spaces only) or ``whitespace`` (also splits punctuation)."""
    ids = dict(vocab) if isinstance(vocab, Mapping) else {w: i for i, w in enumerate(vocab)}
    raw = Tokenizer(models.WordLevel(ids, unk_token=special.get("unk_token")))
    splitters = {"whitespace_split": pre_tokenizers.WhitespaceSplit, "whitespace": pre_tokenizers.Whitespace}
    raw.pre_tokenizer = splitters[split]()
    return PreTrainedTokenizerFast(tokenizer_object=raw, **special)
