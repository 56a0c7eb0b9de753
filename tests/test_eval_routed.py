"""Evaluation of a task-routed adapter (MTL-LoRA) through ``forward_context`` with ``ml.task_ids``:
mixed-task batches must equal per-item runs with that item's task id."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_eval_lm import PROMPTS, greedy_reference, mc_items, model, reference_loglikelihood, tok  # noqa: F401

from metalora.adapters import MTLLoRAConfig, adapter_parameters, add_adapter, merge, task_ids
from metalora.eval.generation import generate
from metalora.eval.multiple_choice import evaluate_multiple_choice


@pytest.fixture(scope="module")
def routed(model):  # noqa: F811
    m = copy.deepcopy(model)
    cfg = MTLLoRAConfig(r=4, task_names=["colors", "geo"], target_modules=["q_proj", "v_proj"], num_up=2)
    m = add_adapter(m, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(m).values():
            p.copy_(torch.randn_like(p) * 0.5)  # B starts at 0; make every task's delta non-zero and distinct
    return m.eval()


def test_routed_multiple_choice_mixed_batches(routed, tok) -> None:  # noqa: F811
    """Oracle: mixed-task batches equal one-item runs with the item's own task id, and routing every row
    to "colors" changes the geo items' scores. Shown to fail when every row is routed to task 0 (planted
    in ``TaskRouter.ids_for``)."""
    items, _ = mc_items()
    route = lambda names: task_ids(routed, names)  # noqa: E731
    result = evaluate_multiple_choice(routed, tok, items, batch_size=3, forward_context=route, progress=False)
    # oracle: one item at a time with its own task id (fp32 model: the adapters keep the dtype they were
    # created with, so ``.double()`` does not reach them; the log-softmax is still taken in float64)
    for item, pred in zip(items, result.predictions, strict=True):
        with task_ids(routed, [item.task]):
            ll = [reference_loglikelihood(routed, tok, item.prompt, " " + o)[0] for o in item.options]
        np.testing.assert_allclose(pred.loglikelihoods, ll, atol=1e-5, rtol=0)
    # the routing matters: sending every row to "colors" changes the geo items' scores
    wrong = evaluate_multiple_choice(
        routed, tok, items, forward_context=lambda n: task_ids(routed, ["colors"] * len(n)), progress=False
    )
    geo = [i for i, item in enumerate(items) if item.task == "geo"]
    assert not np.allclose(
        result.predictions[geo[0]].loglikelihoods, wrong.predictions[geo[0]].loglikelihoods
    )


def test_routed_generation_batched_equals_single(routed, tok) -> None:  # noqa: F811
    """Oracle: each row's greedy continuation equals unbatched, uncached greedy decoding of the adapter
    merged for that row's task (``ml.merge(model, task)``: a plain model, no routing involved), and the
    two tasks' merged models continue at least one prompt differently, so routing changes the output.

    Shown to fail when every row is routed to task 0 (planted in ``TaskRouter.ids_for``): batched and
    single-prompt runs still agreed, as the old test checked, but the "geo" rows did not match the merged
    "geo" model."""
    names = ["colors", "geo", "geo", "colors"]
    route = lambda n: task_ids(routed, n)  # noqa: E731
    batched = generate(routed, tok, PROMPTS, names, max_new_tokens=6, batch_size=4, forward_context=route)
    single = [
        generate(routed, tok, [p], [t], max_new_tokens=6, batch_size=1, forward_context=route)[0]
        for p, t in zip(PROMPTS, names, strict=True)
    ]
    assert batched == single
    merged = {t: merge(routed, t).eval() for t in ("colors", "geo")}
    per_task = {
        t: [tok.decode(greedy_reference(m, tok, p, 6), skip_special_tokens=True) for p in PROMPTS]
        for t, m in merged.items()
    }
    assert per_task["colors"] != per_task["geo"], "the two tasks' adapters should continue differently"
    assert batched == [per_task[t][i] for i, t in enumerate(names)]
