"""The prefix-cached option scorer (``metalora.eval.prefix_cache``) against one full forward per option.

Oracle (to 1e-5, and 8 fp32 ulps at |LL| ≈ 60): ``evaluate_multiple_choice(..., prefix_cache=False)``, which ``test_eval_lm.py`` checks against a
float64 one-sequence-at-a-time reference and lm-eval. Few-shot contexts under ``first_n`` share a long
prefix (description + exemplars), options of one and several tokens, four decoder families (rotary
Llama/Qwen2, Gemma 3 with sliding-window layers, GPT-2's learned positions), and a task-routed adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_eval_lm import CORPUS, mc_items  # noqa: F401  (fixtures below)
from test_eval_lm import tok as tok  # noqa: F401  (the BPE tokenizer fixture)

import metalora as ml
from metalora.eval import evaluate_multiple_choice
from metalora.eval.prefix_cache import common_prefix_length
from metalora.testing import tiny_model


def _score(model, tok, prefix_cache: bool, **kwargs):
    items, dev = mc_items()
    return evaluate_multiple_choice(
        model, tok, items, fewshot_pool=dev, num_fewshot=2, description="Answer the questions.\n\n",
        progress=False, prefix_cache=prefix_cache, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_cached_scores_equal_full_forwards(tok, family):  # noqa: F811
    extra = {"n_positions": 512} if family == "gpt2" else {"max_position_embeddings": 512}
    model = tiny_model(family, vocab_size=len(tok), initializer_range=0.3, **extra)
    plain, cached = _score(model, tok, False), _score(model, tok, True)
    for p, c in zip(plain.predictions, cached.predictions, strict=True):
        np.testing.assert_allclose(c.loglikelihoods, p.loglikelihoods, atol=1e-5, rtol=1e-6)
        assert (c.is_greedy, c.num_tokens, c.pred, c.pred_norm) == (
            p.is_greedy,
            p.num_tokens,
            p.pred,
            p.pred_norm,
        )
    assert cached.per_task == plain.per_task


def test_cached_scores_route_a_task_adapter(tok):  # noqa: F811
    model = ml.add_adapter(
        tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512, initializer_range=0.3),
        ml.MTLLoRAConfig(r=4, task_names=["colors", "geo"]),
        seed=0,
    )
    with torch.no_grad():  # a trained-looking adapter: B away from zero, so the two tasks differ
        for name, p in ml.adapter_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.3)

    def route(names):
        return ml.task_ids(model, names)

    plain, cached = (
        _score(model, tok, False, forward_context=route),
        _score(model, tok, True, forward_context=route),
    )
    for p, c in zip(plain.predictions, cached.predictions, strict=True):
        np.testing.assert_allclose(c.loglikelihoods, p.loglikelihoods, atol=1e-5, rtol=1e-6)


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
