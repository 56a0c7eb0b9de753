"""META-LoRA's similarity scores and sample weights: what is captured, how it is reduced, how u becomes w.

For every hooked site l (an adapter bottleneck, or a whole adapted linear layer) and every sample i,
one forward/backward gives the activation a_{i,p} at each position p and the gradient g_{i,p} of the
sample's loss ℓ_i with respect to the site's output-side tensor. Each is reduced to one vector per
sample with position weights (``position_weights``):

    ā_i = Σ_p ω^a_{i,p} a_{i,p}          ĝ_i = Σ_p ω^g_{i,p} g_{i,p}

and the score of training sample i against the validation batch V is

    u_i = Σ_l (1/|V|) Σ_{v∈V} (ā_i·ā_v)(ĝ_i·ĝ_v)            (``val_aggregation="per_sample"``, default)
    u_i = Σ_l (ā_i · mean_v ā_v)(ĝ_i · mean_v ĝ_v)           (``"mean"``: the published code)

The per-sample form is Ren et al.'s (2018) derivation that META-LoRA builds on: ⟨∇ℓ_i, ∇L_V⟩ with
L_V the mean validation loss is the mean over v of ⟨∇ℓ_i, ∇ℓ_v⟩, and each pair is approximated by the
rank-one product. The published code averages the validation statistics first, then multiplies.

Sites (``similarity``):

* ``"low_rank"`` (L, the paper): a = z, the rank-r input of the up-projection (``layer_bottlenecks``:
  PEFT's ``lora_B``, or metalora's ``bottleneck`` after Λ_t A x), g = ∂ℓ/∂z. r numbers per token.
* ``"dense"`` (D): a = x, the input of the adapted linear layer, g = ∂ℓ/∂h, the gradient at its output.
  (x_i·x_v)(ĝ_i·ĝ_v) is the rank-one estimate of ⟨∇W ℓ_i, ∇W ℓ_v⟩ of the dense weight.
* ``"exact"`` (reference, small models): u_i = ⟨∇_θ ℓ_i, ∇_θ L_V⟩ over the adapter tensors θ of the
  selected layers, from true per-sample gradients (``reweight.py`` computes them).

Positions (``positions``). The causal-LM loss of a sample is ℓ_i = (1/n_i) Σ_{p: y_{i,p+1} ≠ -100}
−log P(y_{i,p+1} | tokens ≤ p): position p carries a loss term iff the *next* label is a response token,
so the response mask is the label mask shifted left by one (the last prompt position predicts the first
response token; the last response position predicts nothing).

* ``"response"`` (default, paper): ω^a = mask/n_i (the mean activation over loss positions), ω^g = mask
  (the sum of the gradient there; ℓ_i is already a per-token mean, so the sum is the sample's gradient
  signal). Prompt positions do receive gradient (later tokens attend to them) but are excluded, as the
  paper prescribes; padding gets neither gradient nor weight. An all-masked sample has ā = ĝ = 0, u = 0.
* ``"nonpad"``: the same over every non-padding position (prompt included).
* ``"all"`` (published code): the plain mean over all L positions, padding and prompt included, for
  both a and g.

Scores (``ReweightConfig.score``, our options besides the paper's ``dot``): ``cosine`` divides u_i by
the estimate of ‖∇ℓ_i‖ (``sample_norms``); ``layer_cosine`` normalises every site's ā and ĝ first
(``unit_stats``), so u_i = Σ_l Σ_v β_v cos_l(i, v) and every site votes with the same weight.

Weights (``clipped_weights``): w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ) (paper), or with
``negative="shift"`` (published code) u ← u − 2·min(u) when min(u) < 0 before normalising. When
Σ_j max(u_j, 0) ≤ δ — at the first step B = 0 makes g = 0 and u = 0 for every sample — the formula
would give no update at all; ``fallback="uniform"`` (default) uses w = 1/B instead and records it,
``"zero"`` keeps the all-zero weights (the published code then skips the step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from metalora.adapters import adapter_layers, adapter_parameters, layer_bottlenecks
from metalora.train.loss import IGNORE_INDEX

SIMILARITIES = ("low_rank", "dense", "exact")
MODULE_SUBSETS = ("all", "attention", "mlp")
POSITIONS = ("response", "nonpad", "all")
VAL_AGGREGATIONS = ("per_sample", "mean")
SCORES = ("dot", "cosine", "layer_cosine")
NEGATIVES = ("clip", "shift")
FALLBACKS = ("uniform", "zero")

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


# --- positions ----------------------------------------------------------------------------------------


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: position p carries a loss term iff labels[:, p+1] ≠ -100 (last position: never)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def position_weights(
    labels: torch.Tensor, attention_mask: torch.Tensor, positions: str = "response"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω^a, ω^g), each [B, L] float64: ā = Σ_p ω^a a_p (a mean), ĝ = Σ_p ω^g g_p (see the module doc)."""
    if positions == "all":
        uniform = torch.full(labels.shape, 1.0 / labels.shape[1], dtype=torch.float64)
        return uniform, uniform
    if positions == "response":
        mask = loss_positions(labels)
    elif positions == "nonpad":
        mask = attention_mask.bool()
    else:
        raise ValueError(f"positions={positions!r}: expected one of {POSITIONS}")
    mask = mask.to(torch.float64)
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0), mask


# --- capturing reduced activations and gradients -------------------------------------------------------


@dataclass
class SiteStats:
    """Per-sample reductions at one site: ā [B, d_a] and ĝ [B, d_g] (float64)."""

    a: torch.Tensor
    g: torch.Tensor


def _reduce(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_p weights[b, p] · t[b, p, :] in float64, for t of shape [B, L, d]."""
    t = t.detach()  # [B, L, d]
    return torch.einsum("bld,bl->bd", t.to(torch.float64), weights.to(t.device))


class StatCapture:
    """Hooks that record ā (in the forward) and ĝ (in the backward) at every site, for one batch.

    Only the reduced [B, d] vectors are kept; the per-token tensors are released as usual. ``low_rank``
    sites hook the *input* of the bottleneck module (z) and its gradient; ``dense`` sites hook the input
    x of the adapted layer and the gradient of its output h.
    """

    def __init__(self, sites: dict[str, nn.Module], similarity: str) -> None:
        self.sites, self.similarity = sites, similarity
        self.a: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._weights is None:
                return
            wa, wg = self._weights
            x = args[0]
            if tuple(x.shape[:2]) != tuple(wa.shape):
                return  # not a batch of sequences (e.g. PEFT DoRA's identity pass through A and B)
            self.a[name] = _reduce(x, wa)
            watched = output if self.similarity == "dense" else x
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


# --- scores and weights -------------------------------------------------------------------------------


def similarity_matrix(train: dict[str, SiteStats], val: dict[str, SiteStats]) -> torch.Tensor:
    """S [B, |V|] (float64): S_iv = Σ_l (ā_i·ā_v)(ĝ_i·ĝ_v), the rank-one estimate of ⟨∇ℓ_i, ∇ℓ_v⟩.
    ``similarity_matrix(val, val)`` is the validation Gram matrix (``val_direction``)."""
    if train.keys() != val.keys():
        raise ValueError("train and validation statistics come from different sites")
    s = None
    for name, t in train.items():
        v = val[name]
        term = (t.a @ v.a.T) * (t.g @ v.g.T)
        s = term if s is None else s + term
    assert s is not None, "no similarity sites"
    return s


def similarity_scores(
    train: dict[str, SiteStats],
    val: dict[str, SiteStats],
    aggregation: str = "per_sample",
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """u [B] (float64) from per-sample train and validation statistics (formulas in the module doc).

    ``coefficients``: β [|V|] of ``val_direction`` (per-sample aggregation only), u = S β; None is the
    paper's β = 1/|V|."""
    if aggregation not in VAL_AGGREGATIONS:
        raise ValueError(f"val_aggregation={aggregation!r}: expected one of {VAL_AGGREGATIONS}")
    if train.keys() != val.keys():
        raise ValueError("train and validation statistics come from different sites")
    if aggregation == "per_sample":
        s = similarity_matrix(train, val)  # mean_v (ā_i·ā_v)(ĝ_i·ĝ_v), or Σ_v β_v (…)
        return s.mean(1) if coefficients is None else s @ coefficients.to(s)
    if coefficients is not None:
        raise ValueError("validation coefficients need val_aggregation='per_sample'")
    u = None
    for name, t in train.items():
        v = val[name]
        term = (t.a @ v.a.mean(0)) * (t.g @ v.g.mean(0))  # (ā_i·ā_V)(ĝ_i·ĝ_V)
        u = term if u is None else u + term
    assert u is not None, "no similarity sites"
    return u


def sample_norms(train: dict[str, SiteStats]) -> torch.Tensor:
    """‖∇ℓ_i‖ [B] (float64) as the same statistics estimate it: sqrt(Σ_l (ā_i·ā_i)(ĝ_i·ĝ_i)), the norm the
    rank-one approximation ∇_l ℓ_i ≈ ĝ_i ā_iᵀ gives (for ``score="cosine"``)."""
    total = None
    for t in train.values():
        term = (t.a * t.a).sum(1) * (t.g * t.g).sum(1)
        total = term if total is None else total + term
    assert total is not None, "no similarity sites"
    return total.sqrt()


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def unit_stats(stats: dict[str, SiteStats]) -> dict[str, SiteStats]:
    """ā/‖ā‖ and ĝ/‖ĝ‖ at every site (a zero vector stays zero), for ``score="layer_cosine"``.

    With them each site's term (ā_i·ā_v)(ĝ_i·ĝ_v) becomes cos(ĝ_i ā_iᵀ, ĝ_v ā_vᵀ), the cosine of the two
    rank-one gradient estimates of that site (‖ĝāᵀ‖_F = ‖ĝ‖‖ā‖), so u_i = Σ_l Σ_v β_v cos_l(i, v): every
    site votes with the same weight, where the plain dot lets the few sites with the largest gradients
    decide. It is still an inner product, of the site-normalised gradients, so the Gram matrix and the
    validation directions of ``val_direction`` apply to it unchanged."""
    return {n: SiteStats(_unit_rows(s.a), _unit_rows(s.g)) for n, s in stats.items()}


def layer_parameter_names(model: nn.Module, modules: str = "all") -> dict[str, list[str]]:
    """The adapter tensors of every selected layer, by layer (``exact`` similarity's sites)."""
    names = list(selected_parameters(model, modules))
    return {
        layer: [n for n in names if n.startswith(f"{layer}.")] for layer in selected_layers(model, modules)
    }


def layer_unit_rows(per_sample: dict[str, torch.Tensor], layers: dict[str, list[str]]) -> torch.Tensor:
    """[B, P] float64: each sample's gradient of every layer's tensors, divided by its norm over that layer
    (``score="layer_cosine"`` in ``exact`` mode: the true per-layer cosines), concatenated."""
    parts = []
    for names in layers.values():
        if names:
            parts.append(
                _unit_rows(torch.cat([per_sample[n].flatten(1).to(torch.float64) for n in names], 1))
            )
    return torch.cat(parts, 1)


def cosine_scores(u: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """u_i / ‖∇ℓ_i‖ (0 where the norm is 0): only the direction of a sample's gradient counts, so samples
    with large losses (and gradients) cannot dominate w by magnitude alone. ‖∇L_V‖ is the same for every
    i and cancels in w."""
    return torch.where(norms > 0, u / norms.clamp(min=torch.finfo(norms.dtype).tiny), torch.zeros_like(u))


@dataclass
class Weights:
    """Normalised sample weights and how they were obtained."""

    w: torch.Tensor
    """[B] float64, non-negative; sums to ≈1 (or all zero with ``fallback="zero"``)."""
    fallback: bool
    """True when Σ max(u, 0) ≤ δ and the fallback rule decided the weights."""
    shifted: bool = False
    """True when ``negative="shift"`` moved u by −2·min(u)."""


def clipped_weights(
    u: torch.Tensor,
    delta: float = 1e-30,
    negative: str = "clip",
    fallback: str = "uniform",
    valid: torch.Tensor | None = None,
) -> Weights:
    """w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ); ``negative="shift"``: u − 2·min(u) when min(u) < 0.

    ``valid`` [B] bool marks samples that have a loss at all; the others always get weight 0 (also under
    the shift and the uniform fallback, which spreads 1 over the valid samples only).
    """
    if negative not in NEGATIVES or fallback not in FALLBACKS:
        raise ValueError(f"negative={negative!r} / fallback={fallback!r}: expected {NEGATIVES} / {FALLBACKS}")
    u = u.to(torch.float64)
    valid = torch.ones_like(u, dtype=torch.bool) if valid is None else valid.to(u.device)
    u = torch.where(valid, u, torch.zeros_like(u))
    shifted = False
    if negative == "shift" and bool(valid.any()) and float(u[valid].min()) < 0:
        u = torch.where(valid, u - 2 * u[valid].min(), u)
        shifted = True
    pos = u.clamp(min=0.0)
    total = float(pos.sum())
    if total <= delta or not math.isfinite(total):
        if fallback == "uniform" and bool(valid.any()):
            return Weights(valid.to(torch.float64) / valid.sum(), fallback=True, shifted=shifted)
        return Weights(torch.zeros_like(u), fallback=True, shifted=shifted)
    return Weights(pos / (total + delta), fallback=False, shifted=shifted)


def weight_statistics(w: torch.Tensor, tol: float = 0.0) -> dict[str, float]:
    """Entropy −Σ p log p of p = w/Σw, effective sample size (Σw)²/Σw², fraction of weights ≤ tol."""
    w = w.to(torch.float64)
    total = float(w.sum())
    n = w.numel()
    if total <= 0:
        return {"weight_entropy": 0.0, "weight_ess": 0.0, "weight_frac_zero": 1.0, "weight_max": 0.0}
    p = w / total
    nz = p[p > 0]
    return {
        "weight_entropy": float(-(nz * nz.log()).sum()),
        "weight_ess": total**2 / float((w * w).sum()),
        "weight_frac_zero": float((w <= tol).sum()) / n,
        "weight_max": float(w.max()),
    }


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
    from metalora.adapters.lora import PEFT_ADAPTER_NAME, is_peft_lora_layer

    covered: set[int] = set()
    for layer in adapter_layers(model).values():
        if not is_peft_lora_layer(layer) or PEFT_ADAPTER_NAME in getattr(layer, "lora_variant", {}):
            return False
        a, b = layer.lora_A[PEFT_ADAPTER_NAME], layer.lora_B[PEFT_ADAPTER_NAME]
        if a.bias is not None or b.bias is not None:
            return False
        covered |= {id(a.weight), id(b.weight)}
    return all(id(p) in covered for p in adapter_parameters(model).values())


class PerSampleLoRAGrads:
    """Per-sample gradients of PEFT LoRA's A and B, formed inside the one backward of Σ_i ℓ_i.

    With h = B z (the up-projection's output before the scaling), z = A x̃ and x̃ = dropout(x):

        ∇_B ℓ_i = Σ_p (∂ℓ_i/∂h_{i,p}) z_{i,p}ᵀ        [out, r]
        ∇_A ℓ_i = Σ_p (∂ℓ_i/∂z_{i,p}) x̃_{i,p}ᵀ        [r, in]

    Samples of a causal LM do not interact, so the gradient of the *unweighted* Σ_j ℓ_j at sample i's
    activations is ∂ℓ_i; the hooks turn it into the per-sample gradients above as the backward passes
    each layer (x̃ and z are the tensors autograd saves anyway, held no longer than it holds them).
    Once w is known, ∇ Σ_i w_i ℓ_i = Σ_i w_i ∇ℓ_i needs no second backward (``weighted``).
    Costs B × (adapter size) floats of memory.
    """

    def __init__(self, model: nn.Module) -> None:
        from metalora.adapters.lora import PEFT_ADAPTER_NAME

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
        def a_hook(module: nn.Module, args: tuple, z: torch.Tensor) -> None:
            x = args[0].detach()
            if z.requires_grad:
                z.register_hook(lambda g: self._store(a_name, self._per_sample(g, x, a.weight)))

        def b_hook(module: nn.Module, args: tuple, h: torch.Tensor) -> None:
            z = args[0].detach()
            if h.requires_grad:
                h.register_hook(lambda g: self._store(b_name, self._per_sample(g, z, b.weight)))

        return [a.register_forward_hook(a_hook), b.register_forward_hook(b_hook)]

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
        """Σ_i w_i ∇ℓ_i for every adapter tensor (zeros for a tensor the backward never reached)."""
        out = {}
        for name, p in params.items():
            g = self.grads.get(name)
            out[name] = torch.zeros_like(p) if g is None else torch.einsum("b,b...->...", w.to(g), g)
        return out
