"""The adapters' math against independent references: float64 Eq. 4, PEFT LoRA, per-sample loops."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import metalora as ml
from metalora.adapters import adapter_layers
from metalora.adapters.hydra_lora import HydraLoRALayer
from metalora.adapters.moelora import MoELoRALayer
from metalora.adapters.mtl_lora import MTLLoRALayer
from metalora.adapters.multilora import MultiLoRALayer
from metalora.testing import VOCAB, randomize_adapter, tiny_model


def _reference_mtl(
    layer: MTLLoRALayer, x: torch.Tensor, ids: torch.Tensor, tau: float, scale: float, form: str
) -> torch.Tensor:
    """Eq. 4 sample by sample in float64: W x + (α/r) Σ_i softmax(w_t/τ)_i B^i Λ_t A x.

    τ, α/r and the form of Λ come from the caller (the config's values), never from the layer under test:
    only the learned tensors (W, A, Λ, B, w) are read from it."""
    d = torch.float64
    W, bias = layer.base_layer.weight.to(d), layer.base_layer.bias
    A, B, w = layer.lora_A.to(d), layer.lora_B.to(d), layer.lora_mix_logits.to(d)
    outs = []
    for b in range(x.shape[0]):
        t = int(ids[b])
        if form == "none":  # the ablation: Λ_t = I (typed here; the layer must hold no Λ)
            lam = torch.eye(A.shape[0], dtype=d)
        else:
            lam = layer.lora_lambda[t].to(d)
            lam = torch.diag(lam) if form == "diagonal" else lam
        s = torch.softmax(w[t] / tau, dim=0)
        xb = x[b].to(d)  # [L, in]
        h = xb @ W.T + (0 if bias is None else bias.to(d))
        delta = sum(s[i] * (B[i] @ lam @ A @ xb.T).T for i in range(B.shape[0]))
        outs.append(h + scale * delta)
    return torch.stack(outs)


@pytest.mark.parametrize("lambda_form", ["full", "diagonal", "none"])
def test_mtl_lora_layer_equals_float64_eq4_with_random_parameters(lambda_form):
    """Oracle: Eq. 4 in float64 with τ = 0.7 and α/r = 12/4 = 3 typed here, not read back from the layer.

    Shown to fail when the layer ignores the config's temperature (``self.temperature = 0.1``) or its
    alpha (``self.scaling = 16 / r``): both were planted in ``adapters/`` and the assert failed."""
    config = ml.MTLLoRAConfig(
        r=4, alpha=12.0, num_tasks=3, num_up=3, temperature=0.7, lambda_form=lambda_form
    )
    model = ml.add_adapter(tiny_model("llama"), config)
    randomize_adapter(model, scale=0.5)
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(4, 5, 32)
    ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad(), ml.task_ids(model, ids):
        got = layer(x)
    expected = _reference_mtl(layer, x, ids, tau=0.7, scale=12.0 / 4, form=lambda_form)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _reference_token_loop(layer, x, scale: float, ids=None) -> torch.Tensor:
    """The other adapters' updates, token by token in float64 from their defining formulas; ``scale`` is
    the config's α/r (not the layer's ``scaling``)."""
    d = torch.float64
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=d)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t].to(d)
            if isinstance(layer, HydraLoRALayer):  # Σ_j softmax(W_g x)_j B^j A x
                g = torch.softmax(layer.lora_router.weight.to(d) @ v, 0)
                delta = sum(g[j] * layer.lora_B[j].to(d) @ (layer.lora_A.to(d) @ v) for j in range(len(g)))
            elif isinstance(layer, MultiLoRALayer):  # Σ_i diag(s_i) B^i A^i x
                delta = sum(
                    layer.lora_scale[i].to(d) * (layer.lora_B[i].to(d) @ (layer.lora_A[i].to(d) @ v))
                    for i in range(layer.lora_A.shape[0])
                )
            elif isinstance(layer, MoELoRALayer):  # Σ_j ω_tj B_j A_j x, experts of rank r/N
                e = layer.lora_task_embedding.weight[int(ids[b])].to(d)
                omega = torch.softmax(layer.lora_gate.weight.to(d) @ e, 0)
                k = layer.expert_rank
                delta = sum(
                    omega[j]
                    * layer.lora_B[:, j * k : (j + 1) * k].to(d)
                    @ (layer.lora_A[j * k : (j + 1) * k].to(d) @ v)
                    for j in range(layer.num_experts)
                )
            out[b, t] = scale * delta
    return out


@pytest.mark.parametrize(
    "config",
    [
        ml.HydraLoRAConfig(r=4, num_heads=3),
        ml.MultiLoRAConfig(r=2, num_parallel=3),
        ml.MoELoRAConfig(r=4, num_tasks=3, num_experts=2),
    ],
    ids=lambda c: c.adapter_type,
)
def test_other_adapters_equal_float64_token_loop(config):
    model = ml.add_adapter(tiny_model("llama"), config)
    randomize_adapter(model, scale=0.5)
    layer = adapter_layers(model)["model.layers.1.self_attn.v_proj"]
    x = torch.randn(3, 4, 32)
    ids = torch.tensor([1, 0, 2])
    with torch.no_grad():
        if config.task_routed:
            with ml.task_ids(model, ids):
                got = layer.adapter_delta(x)
        else:
            got = layer.adapter_delta(x)
    expected = _reference_token_loop(layer, x, config.alpha / config.r, ids)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_mtl_lora_with_one_up_projection_and_identity_lambda_equals_peft_lora():
    torch.manual_seed(3)
    x = torch.randint(0, VOCAB, (2, 7))
    ours = ml.add_adapter(tiny_model("llama"), ml.MTLLoRAConfig(r=4, alpha=8, num_tasks=2, num_up=1))
    randomize_adapter(ours)
    with torch.no_grad():  # Λ_t = I for both tasks; with n=1 the softmax weight is exactly 1
        for layer in adapter_layers(ours).values():
            layer.lora_lambda.copy_(torch.eye(4).repeat(2, 1, 1))
    reference = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            peft_layer = reference.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0])
        expected = reference(x).logits
        with ml.task_ids(ours, [1, 0]):
            got = ours(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        ml.MTLLoRAConfig(r=4, num_tasks=3),
        ml.MoELoRAConfig(r=4, num_tasks=3, num_experts=2),
    ],
    ids=lambda c: c.adapter_type,
)
def test_mixed_task_batch_equals_per_sample_runs(config):
    model = ml.add_adapter(tiny_model("qwen2"), config)
    randomize_adapter(model)
    x = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(0))
    ids = [2, 0, 1, 2, 0]
    with torch.no_grad():
        with ml.task_ids(model, ids):
            mixed = model(x).logits
        for b, t in enumerate(ids):
            with ml.task_ids(model, [t]):
                single = model(x[b : b + 1]).logits
            torch.testing.assert_close(mixed[b : b + 1], single, rtol=1e-5, atol=1e-5)
    # and the tasks really differ (else the comparison above would be vacuous)
    with torch.no_grad(), ml.task_ids(model, [1]):
        other = model(x[:1]).logits
    assert not torch.allclose(other, mixed[:1], atol=1e-4)


def test_mtl_lora_without_lambda_learns_no_task_transform():
    """Table 5's "w/o Λ_t": the ablation has exactly T·r² fewer trainable parameters per layer than the full
    form (hand count: 3 tasks × 4² = 48 per adapted layer), and with every Λ_t of the full form set to I
    both give the same outputs."""
    full = ml.add_adapter(tiny_model("llama"), ml.MTLLoRAConfig(r=4, num_tasks=3), seed=0)
    none = ml.add_adapter(tiny_model("llama"), ml.MTLLoRAConfig(r=4, num_tasks=3, lambda_form="none"), seed=0)
    layers = len(adapter_layers(full))

    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert count(full) - count(none) == layers * 3 * 4 * 4
    randomize_adapter(none, scale=0.5)
    with torch.no_grad():
        state = {k: v for k, v in none.state_dict().items() if "lora_" in k}
        full.load_state_dict(state, strict=False)  # Λ_t stays the identity it was initialised to
    x = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 2, 1])
    with torch.no_grad(), ml.task_ids(full, ids), ml.task_ids(none, ids):
        torch.testing.assert_close(none(x).logits, full(x).logits, rtol=0, atol=1e-6)
