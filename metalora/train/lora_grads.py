"""Where reweighting looks inside the model: the adapter sites, the hooks that capture per-sample
statistics there, and per-sample gradients of the adapter tensors (PEFT LoRA's in the same backward).

* Sites: ``selected_layers`` (all / attention / MLP adapter layers), ``similarity_sites`` (their rank-r
  bottlenecks for ``low_rank``, the layers themselves for ``dense``), ``selected_parameters`` and
  ``layer_parameter_names`` (the adapter tensors ``exact`` similarity compares).
* ``StatCapture``: forward/backward hooks that reduce every site's activation a and gradient g to one
  vector per sample (ā = Σ_p ω^a_p a_p, ĝ = Σ_p ω^g_p g_p; the weights come from
  ``similarity.position_weights``), keeping only the [B, d] reductions.
* ``per_sample_grads``: ∇_θ ℓ_i by one backward per sample (the ``exact`` reference).
* ``PerSampleLoRAGrads``: per-sample ∇_A ℓ_i, ∇_B ℓ_i of plain PEFT LoRA formed inside the one backward
  of Σ_i ℓ_i (the ``fused`` scheme), where ``fused_supported`` says the adapter allows it.

Gradient checkpointing (non-reentrant; ``train.gradient_checkpointing``) runs a layer's forward again
inside the backward, so every forward hook fires twice. Both captures stay exact: ``StatCapture`` records
nothing in a recompute (``recomputing``), and ``PerSampleLoRAGrads`` receives its activations as saved
tensors of an autograd node of the original graph, which runs once per backward.

The maths on the captured tensors is ``similarity.py``; this module only touches the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from metalora.adapters import adapter_layers, adapter_parameters, layer_bottlenecks
from metalora.adapters.lora import PEFT_ADAPTER_NAME, is_peft_lora_layer
from metalora.train.similarity import SiteStats

SITE_KINDS = ("low_rank", "dense")
MODULE_SUBSETS = ("all", "attention", "mlp")

_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "feedforward")


# --- which modules ------------------------------------------------------------------------------------


def layer_kind(name: str) -> str | None:
    """``"attention"`` or ``"mlp"`` from a module path (``model.layers.0.self_attn.q_proj`` → attention)."""
    parts = name.lower().split(".")
    if any(any(k in part for k in _ATTENTION_PARTS) for part in parts):
        return "attention"
    if any(any(k in part for k in _MLP_PARTS) for part in parts):
        return "mlp"
    return None


def selected_layers(model: nn.Module, modules: str = "all") -> dict[str, nn.Module]:
    """The adapter layers of the subset ``all`` / ``attention`` / ``mlp``; raises if it is empty."""
    if modules not in MODULE_SUBSETS:
        raise ValueError(f"modules={modules!r}: expected one of {MODULE_SUBSETS}")
    layers = adapter_layers(model)
    chosen = {n: m for n, m in layers.items() if modules == "all" or layer_kind(n) == modules}
    if not chosen:
        raise ValueError(
            f"modules={modules!r} selects none of the adapted layers {sorted(layers)[:4]}…; "
            "adapt attention and/or MLP projections (target_modules) or choose another subset"
        )
    return chosen


def similarity_sites(model: nn.Module, similarity: str, modules: str = "all") -> dict[str, nn.Module]:
    """Modules to hook: bottlenecks (``low_rank``) or the adapted layers themselves (``dense``)."""
    layers = selected_layers(model, modules)
    if similarity == "dense":
        return layers
    if similarity != "low_rank":
        raise ValueError(f"similarity={similarity!r} has no hook sites (expected low_rank or dense)")
    sites = {}
    for name, layer in layers.items():
        for k, module in enumerate(layer_bottlenecks(layer)):
            sites[f"{name}#{k}"] = module
    return sites


def selected_parameters(model: nn.Module, modules: str = "all") -> dict[str, nn.Parameter]:
    """Adapter tensors that belong to the selected layers (what ``exact`` similarity compares)."""
    prefixes = tuple(f"{n}." for n in selected_layers(model, modules))
    return {n: p for n, p in adapter_parameters(model).items() if n.startswith(prefixes)}


def layer_parameter_names(model: nn.Module, modules: str = "all") -> dict[str, list[str]]:
    """The adapter tensors of every selected layer, by layer (``exact`` similarity's sites)."""
    names = list(selected_parameters(model, modules))
    return {
        layer: [n for n in names if n.startswith(f"{layer}.")] for layer in selected_layers(model, modules)
    }


# --- capturing reduced activations and gradients -------------------------------------------------------


def recomputing() -> bool:
    """True while the autograd engine runs (inside a backward): a forward there is a gradient-checkpointing
    recompute, not a new batch (the test ``adapters/routing.py`` uses for the same reason)."""
    return torch._C._current_graph_task_id() != -1


def _reduce(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_p weights[b, p] · t[b, p, :] in float64, for t of shape [B, L, d]."""
    t = t.detach()  # [B, L, d]
    return torch.einsum("bld,bl->bd", t.to(torch.float64), weights.to(t.device))


class StatCapture:
    """Hooks that record ā (in the forward) and ĝ (in the backward) at every site, for one batch.

    Only the reduced [B, d] vectors are kept; the per-token tensors are released as usual. ``low_rank``
    sites hook the *input* of the bottleneck module (z) and its gradient; ``dense`` sites hook the input
    x of the adapted layer and the gradient of its output h.

    Under (non-reentrant) gradient checkpointing the forward of a layer runs again inside the backward;
    that recompute records nothing (``recomputing``): ā is the original forward's, and ĝ comes from the
    tensor hook the original forward registered, which fires once, since the backward runs through the
    original graph (the recompute only refills its saved tensors).
    """

    def __init__(self, sites: dict[str, nn.Module], similarity: str) -> None:
        if similarity not in SITE_KINDS:
            raise ValueError(f"similarity={similarity!r}: expected one of {SITE_KINDS}")
        self.sites = sites
        self.watch_output = similarity == "dense"  # ĝ at the layer's output h, else at its input z
        self.a: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._weights is None or recomputing():
                return  # a checkpointing recompute: the original forward's records and hooks count
            wa, wg = self._weights
            x = args[0]
            if tuple(x.shape[:2]) != tuple(wa.shape):
                return  # not a batch of sequences (e.g. PEFT DoRA's identity pass through A and B)
            self.a[name] = _reduce(x, wa)
            watched = output if self.watch_output else x
            # ĝ = 0 unless the backward reaches this site (a site with no path to the loss).
            self.g[name] = torch.zeros(wg.shape[0], watched.shape[-1], dtype=torch.float64)
            if watched.requires_grad:

                def grad_hook(grad: torch.Tensor) -> None:
                    self.g[name] = _reduce(grad, wg)

                watched.register_hook(grad_hook)

        return forward_hook

    @contextmanager
    def capture(self, weights: tuple[torch.Tensor, torch.Tensor]) -> Iterator[StatCapture]:
        """Record the batch run inside the block with position weights ``(ω^a, ω^g)``."""
        self.a, self.g, self._weights = {}, {}, weights
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.sites.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def stats(self) -> dict[str, SiteStats]:
        """The captured statistics by site (call after the backward)."""
        self._weights = None
        return {name: SiteStats(a=a, g=self.g[name].to(a.device)) for name, a in self.a.items()}


# --- per-sample adapter gradients ----------------------------------------------------------------------


def per_sample_grads(
    losses: torch.Tensor, params: dict[str, nn.Parameter], retain_graph: bool = False
) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]}: ∇_θ ℓ_i for every sample, one backward per sample through the shared graph.

    The ``exact`` reference (B backward passes): use it on small models only.
    """
    names, tensors = list(params), list(params.values())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(losses.shape[0]):
        keep = retain_graph or i < losses.shape[0] - 1
        grads = torch.autograd.grad(losses[i], tensors, retain_graph=keep, allow_unused=True)
        for n, p, g in zip(names, tensors, grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(rows[n]) for n in names}


def fused_supported(model: nn.Module) -> bool:
    """True when every adapter tensor is a PEFT LoRA ``lora_A``/``lora_B`` weight of a vanilla LoRA layer
    (no DoRA or other variant, no bias): then ``PerSampleLoRAGrads`` covers the whole gradient."""
    covered: set[int] = set()
    for layer in adapter_layers(model).values():
        if not is_peft_lora_layer(layer) or PEFT_ADAPTER_NAME in getattr(layer, "lora_variant", {}):
            return False
        a, b = layer.lora_A[PEFT_ADAPTER_NAME], layer.lora_B[PEFT_ADAPTER_NAME]
        if a.bias is not None or b.bias is not None:
            return False
        covered |= {id(a.weight), id(b.weight)}
    return all(id(p) in covered for p in adapter_parameters(model).values())


class _GradTap(torch.autograd.Function):
    """Identity on ``out``; its backward hands (∂L/∂out, ``act``) to ``sink`` and passes the gradient on.

    ``act`` is kept with ``save_for_backward``, so autograd holds it like any saved activation: without
    checkpointing it is the very tensor the adapter's own matmul saves (no extra memory); under gradient
    checkpointing it is dropped after the forward and refilled by the layer's recompute, where a closure
    holding it would keep every layer's input alive and undo the saving. The node runs once per backward.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, act: torch.Tensor, sink: Callable) -> torch.Tensor:
        ctx.save_for_backward(act)
        ctx.sink = sink
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (act,) = ctx.saved_tensors
        ctx.sink(grad, act)
        return grad, None, None


class PerSampleLoRAGrads:
    """Per-sample gradients of PEFT LoRA's A and B, formed inside the one backward of Σ_i ℓ_i.

    With h = B z (the up-projection's output before the scaling), z = A x̃ and x̃ = dropout(x):

        ∇_B ℓ_i = Σ_p (∂ℓ_i/∂h_{i,p}) z_{i,p}ᵀ        [out, r]
        ∇_A ℓ_i = Σ_p (∂ℓ_i/∂z_{i,p}) x̃_{i,p}ᵀ        [r, in]

    Samples of a causal LM do not interact, so the gradient of the *unweighted* Σ_j ℓ_j at sample i's
    activations is ∂ℓ_i; the hooks turn it into the per-sample gradients above as the backward passes
    each layer (x̃ and z are the tensors autograd saves anyway, held no longer than it holds them).
    Once w is known, ∇ Σ_i w_i ℓ_i = Σ_i w_i ∇ℓ_i needs no second backward (``weighted``).
    Costs B × (adapter size) floats of memory. The activations reach the backward as saved tensors of a
    ``_GradTap`` node, so gradient checkpointing recomputes them like the rest of the layer.
    """

    def __init__(self, model: nn.Module) -> None:
        if not fused_supported(model):
            raise ValueError(
                "per-sample LoRA gradients need plain PEFT LoRA layers (no DoRA, no metalora layers)"
            )
        names = {id(p): n for n, p in adapter_parameters(model).items()}
        self.modules: list[tuple[nn.Module, str, nn.Module, str]] = []
        for layer in adapter_layers(model).values():
            a, b = layer.lora_A[PEFT_ADAPTER_NAME], layer.lora_B[PEFT_ADAPTER_NAME]
            self.modules.append((a, names[id(a.weight)], b, names[id(b.weight)]))
        self.grads: dict[str, torch.Tensor] = {}

    @staticmethod
    def _per_sample(grad: torch.Tensor, act: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b = act.shape[0]
        grad = grad.reshape(b, -1, grad.shape[-1]).to(torch.promote_types(like.dtype, torch.float32))
        act = act.reshape(b, -1, act.shape[-1]).to(grad.dtype)
        return torch.einsum("blo,bli->boi", grad, act).to(like.dtype)  # Σ_p grad_p act_pᵀ per sample

    def _hooks(self, a: nn.Module, a_name: str, b: nn.Module, b_name: str) -> list:
        def sink(name: str, weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None]:
            return lambda grad, act: self._store(name, self._per_sample(grad, act, weight))

        def tap(name: str, weight: torch.Tensor):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
                # applied in a recompute too (its node is never run): both passes save the same tensors
                if out.requires_grad:
                    return _GradTap.apply(out, args[0].detach(), sink(name, weight))
                return None

            return hook

        return [
            a.register_forward_hook(tap(a_name, a.weight)),  # ∂ℓ/∂z with x̃
            b.register_forward_hook(tap(b_name, b.weight)),  # ∂ℓ/∂h with z
        ]

    def _store(self, name: str, grad: torch.Tensor) -> None:
        self.grads[name] = grad if name not in self.grads else self.grads[name] + grad

    @contextmanager
    def capture(self) -> Iterator[PerSampleLoRAGrads]:
        self.grads = {}
        handles = [h for m in self.modules for h in self._hooks(*m)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def weighted(self, w: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Σ_i w_i ∇ℓ_i for every adapter tensor (zeros for a tensor the backward never reached). The
        per-sample gradients (B × the adapter's size) are released here, so none is held between steps."""
        grads, self.grads = self.grads, {}
        out = {}
        for name, p in params.items():
            g = grads.pop(name, None)
            out[name] = torch.zeros_like(p) if g is None else torch.einsum("b,b...->...", w.to(g), g)
        return out
