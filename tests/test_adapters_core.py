"""add_adapter on four model families: targets, freezing, init identity, training touches only the adapter."""

from __future__ import annotations

import contextlib

import pytest
import torch

import metalora as ml
from metalora.adapters import TargetError, adapter_layers, adapter_parameters, is_task_routed
from metalora.testing import FAMILIES, VOCAB, randomize_adapter, tiny_model

CONFIGS = {
    "lora": lambda: ml.LoRAConfig(r=4),
    "dora": lambda: ml.LoRAConfig(r=4, use_dora=True),
    "mtl_lora": lambda: ml.MTLLoRAConfig(r=4, num_tasks=3),
    "mtl_lora_diag": lambda: ml.MTLLoRAConfig(r=4, num_tasks=3, lambda_form="diagonal"),
    "mtl_lora_none": lambda: ml.MTLLoRAConfig(r=4, num_tasks=3, lambda_form="none"),
    "hydra_lora": lambda: ml.HydraLoRAConfig(r=4, num_heads=3),
    "multilora": lambda: ml.MultiLoRAConfig(r=4, num_parallel=2),
    "moelora": lambda: ml.MoELoRAConfig(r=4, num_tasks=3, num_experts=2),
}
IDS = torch.tensor([0, 2, 1])


def routing(model, ids=IDS):
    return ml.task_ids(model, ids) if is_task_routed(model) else contextlib.nullcontext()


def batch(seed=0, b=3, length=6):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_init_output_equals_base(family, name):
    x = batch()
    model = tiny_model(family)
    with torch.no_grad():
        expected = model(x).logits
        ml.add_adapter(model, CONFIGS[name]())
        with routing(model):
            got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_adapter_parameters_change_after_a_step(family, name):
    model = tiny_model(family).train()
    ml.add_adapter(model, CONFIGS[name]())
    randomize_adapter(model)  # so every adapter tensor gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(model).values()}
    opt = torch.optim.SGD(trainable, lr=0.1)
    x = batch()
    with routing(model):
        model(x, labels=x).loss.backward()
    opt.step()
    adapter = set(adapter_parameters(model))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the step changed nothing"
    assert changed <= adapter, f"non-adapter parameters changed: {sorted(changed - adapter)[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_attention_projections(family):
    model = ml.add_adapter(tiny_model(family), ml.MTLLoRAConfig(r=2, num_tasks=2))
    leaves = {n.rsplit(".", 1)[-1] for n in adapter_layers(model)}
    expected = {"c_attn", "c_proj"} if family == "gpt2" else {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert leaves == expected
    if family == "gpt2":  # only the attention output projection, not the MLP's c_proj
        assert all(".attn." in n for n in adapter_layers(model))


def test_regex_and_all_linear_targets():
    model = ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=2, target_modules=r".*layers\.1\..*_proj"))
    assert sorted(adapter_layers(model)) == sorted(
        f"model.layers.1.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    model = ml.add_adapter(tiny_model("qwen2"), ml.HydraLoRAConfig(r=2, target_modules="all-linear"))
    assert len(adapter_layers(model)) == 2 * 7  # lm_head excluded


def test_unknown_target_is_a_clear_error_listing_linear_modules():
    with pytest.raises(TargetError, match=r"\['nope'\].*down_proj.*q_proj"):
        ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=2, target_modules=["q_proj", "nope"]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ml.MTLLoRAConfig(r=0, num_tasks=2), r"MTLLoRAConfig.r=0: expected a positive integer"),
        (lambda: ml.MTLLoRAConfig(r=4), r"num_tasks=None"),
        (
            lambda: ml.MTLLoRAConfig(r=4, num_tasks=3, task_names=["a", "b"]),
            r"num_tasks=3 but task_names has 2",
        ),
        (lambda: ml.MTLLoRAConfig(r=4, num_tasks=2, lambda_form="tri"), r"lambda_form='tri'"),
        (lambda: ml.MoELoRAConfig(r=4, num_tasks=2, num_experts=3), r"divides r=4"),
        (lambda: ml.LoRAConfig(dropout=1.5), r"dropout=1.5"),
    ],
)
def test_config_validation_names_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_adding_twice_is_an_error():
    model = ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has a metalora adapter"):
        ml.add_adapter(model, ml.LoRAConfig(r=2))


def test_bf16_base_gets_fp32_adapter_and_runs():
    model = ml.add_adapter(tiny_model("llama", dtype=torch.bfloat16), ml.MTLLoRAConfig(r=2, num_tasks=2))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
    with ml.task_ids(model, [0, 1, 1]):
        out = model(batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mtl_lora", "hydra_lora", "multilora", "moelora"])
def test_model_double_runs_the_adapter_in_float64(name):
    """Oracle: after ``model.double()`` every adapter tensor is float64, the rank-r activation each layer's
    ``bottleneck`` sees is float64 (the adapter computes in float64, not only its output cast), and the
    logits equal the fp32 model's.

    Shown to fail when the adapter stays fp32 under ``.double()`` (planted: ``AdapterLayer._apply``
    converting only ``base_layer``): the logits were still float64 and within 1e-4, as the old test
    checked, but the dtype asserts failed."""
    model = ml.add_adapter(tiny_model("llama"), CONFIGS[name]())
    randomize_adapter(model)
    x = batch()
    seen: list[torch.dtype] = []
    with torch.no_grad(), routing(model):
        expected = model(x).logits.double()
        model.double()
        hooks = [
            m.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].dtype))
            for layer in adapter_layers(model).values()
            for m in layer.bottleneck_modules()
        ]
        got = model(x).logits
    for h in hooks:
        h.remove()
    assert {n: p.dtype for n, p in adapter_parameters(model).items()} == {
        n: torch.float64 for n in adapter_parameters(model)
    }
    assert seen and set(seen) == {torch.float64}
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
