"""Tiny random-init causal LMs of several families, built from configs (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 64
FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")


def tiny_config(family: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=16)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.name_or_path = f"tiny-{family}"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def randomize_adapter(model, scale: float = 0.2, seed: int = 1) -> None:
    """Give every adapter tensor random values, so tests don't pass only because B = 0 at init."""
    from metalora.adapters import adapter_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
