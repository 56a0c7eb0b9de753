"""R-LoRA against a float64 per-head reference: the forward (eval and with per-head dropout masks), the
exactly-zero initial update, what the first gradient looks like, seeded init, save/load, and its config."""

from __future__ import annotations

import pytest
import torch
from test_train_utils import adapter_state, max_abs_diff

import metalora as ml
from metalora.adapters import AdapterConfigError, NotMergeableError, adapter_layers
from metalora.adapters.r_lora import RLoRALayer
from metalora.testing import randomize_adapter, tiny_llama

IDS = torch.tensor([[1, 5, 9, 13, 7, 22], [3, 8, 2, 40, 11, 6]])


def r_lora_model(seed: int | None = 0, **cfg) -> torch.nn.Module:
    config = ml.RLoRAConfig(**{"r": 4, "num_heads": 3, "alpha": 8.0, **cfg})
    return ml.add_adapter(tiny_llama(dtype=torch.float64), config, seed=seed)


def reference(layer: RLoRALayer, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """h = W x + b + (α/r) Σ_j ω_j(x) B^j drop_j(A x), one token and one head at a time, in float64.

    masks: [B, L, N, r] kept/dropped (1/0) per head, or None (eval: no dropout)."""
    base, p = layer.base_layer, layer.head_dropout
    a, heads, router = layer.lora_A.double(), layer.lora_B.double(), layer.lora_router.weight.double()
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = x[b, t].double()
            h = base.weight.double() @ xt + (0 if base.bias is None else base.bias.double())
            logits = router @ xt
            omega = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            z = a @ xt
            for j in range(heads.shape[0]):
                zj = z if masks is None else z * masks[b, t, j] / (1 - p)
                h = h + layer.scaling * omega[j] * (heads[j] @ zj)
            out[b, t] = h
    return out


def first_layer(model: torch.nn.Module) -> RLoRALayer:
    return adapter_layers(model)["model.layers.0.self_attn.q_proj"]


def test_forward_matches_the_per_head_reference_in_eval():
    model = r_lora_model().eval()
    randomize_adapter(model, scale=0.3)  # so the check does not pass only because of the init
    layer = first_layer(model)
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(layer, x), rtol=0, atol=1e-12)


def test_each_head_gets_its_own_dropout_mask(monkeypatch):
    model = r_lora_model(head_dropout=0.5).train()
    randomize_adapter(model, scale=0.3)
    layer = first_layer(model)
    seen = []
    original = torch.nn.functional.dropout

    def recording(t, p=0.5, training=True, inplace=False):
        out = original(t, p, training, inplace)
        seen.append((t.detach().clone(), out.detach().clone(), p))
        return out

    monkeypatch.setattr(torch.nn.functional, "dropout", recording)
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x)
    (inputs, outputs, p), *rest = seen
    assert not rest and p == 0.5 and inputs.shape == (2, 5, 3, 4)  # [B, L, heads, r]
    masks = (outputs != 0).double()
    # every head's input is the same z = A x; kept entries are scaled by exactly 1/(1-p)
    z = x @ layer.lora_A.T
    assert torch.equal(inputs, z.unsqueeze(-2).expand_as(inputs))
    assert torch.allclose(outputs, masks * inputs / (1 - p), rtol=0, atol=1e-15)
    assert not torch.equal(masks[..., 0, :], masks[..., 1, :]) and not torch.equal(
        masks[..., 1, :], masks[..., 2, :]
    )
    assert 0.3 < float(masks.mean()) < 0.7
    assert torch.allclose(got, reference(layer, x, masks), rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_initial_output_equals_the_base_model(heads):
    base = tiny_llama(dtype=torch.float64)
    model = r_lora_model(num_heads=heads).eval()
    layer = first_layer(model)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, base(IDS).logits, rtol=0, atol=1e-12)
    # the heads are random and distinct, sum to zero, and the router starts uniform
    b = layer.lora_B.detach()
    assert torch.allclose(b.sum(0), torch.zeros_like(b[0]), atol=1e-15)
    assert torch.equal(layer.lora_router.weight, torch.zeros_like(layer.lora_router.weight))
    if heads > 1:
        assert all(not torch.equal(b[i], b[j]) for i in range(heads) for j in range(i + 1, heads))
        std = layer.lora_B.std().item()
        expected = 4**0.25 / 8 / layer.out_features**0.5  # r^{1/4}/sqrt(gamma)/sqrt(out)
        assert 0.6 * expected < std < 1.4 * expected
    else:
        assert torch.equal(b, torch.zeros_like(b))


def test_first_gradient_reaches_router_and_heads_but_not_a():
    """At init (dropout off) ∂L/∂A = s Σ_j ω_j B^jᵀ g = (s/N) (Σ_j B^j)ᵀ g = 0; the router learns."""
    model = r_lora_model().eval()
    model(IDS, labels=IDS).loss.backward()
    layer = first_layer(model)
    assert float(layer.lora_A.grad.abs().max()) < 1e-14
    assert float(layer.lora_router.weight.grad.abs().max()) > 1e-8
    heads = layer.lora_B.grad
    assert float(heads.abs().max()) > 1e-8


def test_seeded_init_is_reproducible_and_leaves_the_global_rng():
    base = tiny_llama(dtype=torch.float64)  # seeds torch itself
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = ml.add_adapter(base, ml.RLoRAConfig(r=4, num_heads=3, alpha=8.0), seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b, c = r_lora_model(seed=7), r_lora_model(seed=8)
    assert max_abs_diff(adapter_state(a), adapter_state(b)) == 0.0
    assert max_abs_diff(adapter_state(a), adapter_state(c)) > 0


def test_save_load_round_trip(tmp_path):
    model = r_lora_model(head_dropout=0.2, init_gamma=16.0).eval()
    randomize_adapter(model, scale=0.3)
    ml.save_adapter(model, tmp_path / "a")
    loaded = ml.load_adapter(tiny_llama(dtype=torch.float64), tmp_path / "a").eval()
    assert max_abs_diff(adapter_state(model), adapter_state(loaded)) == 0.0
    assert first_layer(loaded).head_dropout == 0.2
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_cannot_be_merged_and_config_is_checked():
    with pytest.raises(NotMergeableError, match="HydraLoRA"):
        ml.merge(r_lora_model())
    with pytest.raises(AdapterConfigError, match="head_dropout"):
        ml.RLoRAConfig(head_dropout=1.0)
    with pytest.raises(AdapterConfigError, match="init_gamma"):
        ml.RLoRAConfig(init_gamma=0)
    assert ml.adapters.ADAPTER_TYPES["r_lora"][0] is ml.RLoRAConfig
