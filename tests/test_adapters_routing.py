"""task_ids: names, errors, generate, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

import metalora as ml
from metalora.adapters import TaskRoutingError, adapter_parameters
from metalora.testing import VOCAB, randomize_adapter, tiny_model

NAMES = ["boolq", "piqa", "arc_easy"]


def routed(family="llama", **kw):
    model = ml.add_adapter(tiny_model(family), ml.MTLLoRAConfig(r=4, task_names=NAMES, **kw))
    randomize_adapter(model)
    return model


def test_names_and_ids_route_identically():
    model = routed()
    x = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        with ml.task_ids(model, ["arc_easy", "boolq", "piqa"]):
            by_name = model(x).logits
        with ml.task_ids(model, torch.tensor([2, 0, 1])):
            by_id = model(x).logits
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([0, 3, 1], r"out of range.*3 tasks \(valid ids 0\.\.2\)"),
        ([-1, 0, 0], r"out of range"),
        (["boolq", "mmlu", "piqa"], r"unknown task name\(s\) \['mmlu'\]; known tasks: \['boolq'"),
    ],
)
def test_bad_ids_are_clear_errors(ids, message):
    model = routed()
    with pytest.raises(TaskRoutingError, match=message), ml.task_ids(model, ids):
        pass


def test_missing_ids_and_wrong_count_are_clear_errors():
    model = routed()
    x = torch.randint(0, VOCAB, (3, 5))
    with pytest.raises(TaskRoutingError, match=r"no task ids were given.*metalora.task_ids"):
        model(x)
    with pytest.raises(TaskRoutingError, match=r"2 task ids for a batch of 3"), ml.task_ids(model, [0, 1]):
        model(x)
    plain = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=2))
    with pytest.raises(TaskRoutingError, match="no task-routed adapter"), ml.task_ids(plain, [0]):
        pass


def test_generate_routes_each_sample_like_a_single_sample_run():
    model = routed()
    prompts = torch.randint(2, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    ids = [2, 0, 1]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    with ml.task_ids(model, ids):
        together = model.generate(prompts, **kwargs)
    for b, t in enumerate(ids):
        with ml.task_ids(model, [t]):
            alone = model.generate(
                prompts[b : b + 1], **{**kwargs, "attention_mask": torch.ones(1, 4, dtype=torch.long)}
            )
        assert torch.equal(together[b : b + 1], alone)
    # beam search expands the batch to B·beams rows: each row must keep its sample's task
    with ml.task_ids(model, ids):
        beams = model.generate(prompts, num_beams=2, **kwargs)
    for b, t in enumerate(ids):
        with ml.task_ids(model, [t]):
            alone = model.generate(
                prompts[b : b + 1],
                num_beams=2,
                **{**kwargs, "attention_mask": torch.ones(1, 4, dtype=torch.long)},
            )
        assert torch.equal(beams[b : b + 1], alone)


def _grads(model, x, ids, checkpointing: bool, backward_inside: bool):
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    if backward_inside:
        with ml.task_ids(model, ids):
            model(x, labels=x).loss.backward()
    else:
        with ml.task_ids(model, ids):
            loss = model(x, labels=x).loss
        loss.backward()  # the recompute runs here, after the block: the router must remember the ids
    return {n: p.grad.clone() for n, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_gradients_equal_with_and_without_gradient_checkpointing(family, backward_inside):
    model = routed(family)
    x = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    ids = [1, 2, 0]
    plain = _grads(model, x, ids, checkpointing=False, backward_inside=backward_inside)
    ckpt = _grads(model, x, ids, checkpointing=True, backward_inside=backward_inside)
    assert model.is_gradient_checkpointing
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
