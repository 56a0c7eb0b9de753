"""META-LoRA's similarity scores and sample weights, as pure tensor maths: how captured per-sample
statistics become scores u, and how u becomes w. (What is captured, and where, is ``lora_grads.py``;
which of these functions run is decided once from the config in ``reweight_strategies.py``.)

For every hooked site l (an adapter bottleneck, or a whole adapted linear layer) and every sample i,
one forward/backward gives the activation a_{i,p} at each position p and the gradient g_{i,p} of the
sample's loss ℓ_i with respect to the site's output-side tensor. Each is reduced to one vector per
sample with position weights (``position_weights``):

    ā_i = Σ_p ω^a_{i,p} a_{i,p}          ĝ_i = Σ_p ω^g_{i,p} g_{i,p}

and the score of training sample i against the validation batch V is (paper Eq. 6–7)

    u_i = Σ_l (1/|V|) Σ_{v∈V} (ā_i·ā_v)(ĝ_i·ĝ_v)            (aggregation ``"per_sample"``, default)
    u_i = Σ_l (ā_i · mean_v ā_v)(ĝ_i · mean_v ĝ_v)           (``"mean"``: the published code)

The per-sample form is Ren et al.'s (2018) derivation that META-LoRA builds on: ⟨∇ℓ_i, ∇L_V⟩ with
L_V the mean validation loss is the mean over v of ⟨∇ℓ_i, ∇ℓ_v⟩, and each pair is approximated by the
rank-one product. The published code averages the validation statistics first, then multiplies.

Sites (``reweight.stats.similarity``):

* ``"low_rank"`` (L, the paper): a = z, the rank-r input of the up-projection (``layer_bottlenecks``:
  PEFT's ``lora_B``, or metalora's ``bottleneck`` after Λ_t A x), g = ∂ℓ/∂z. r numbers per token.
* ``"dense"`` (D): a = x, the input of the adapted linear layer, g = ∂ℓ/∂h, the gradient at its output.
  (x_i·x_v)(ĝ_i·ĝ_v) is the rank-one estimate of ⟨∇W ℓ_i, ∇W ℓ_v⟩ of the dense weight.
* ``"exact"`` (reference, small models): u_i = ⟨∇_θ ℓ_i, ∇_θ L_V⟩ over the adapter tensors θ of the
  selected layers, from true per-sample gradients (``lora_grads.per_sample_grads``).

Positions (``reweight.stats.positions``). The causal-LM loss of a sample is ℓ_i = (1/n_i)
Σ_{p: y_{i,p+1} ≠ -100} −log P(y_{i,p+1} | tokens ≤ p): position p carries a loss term iff the *next*
label is a response token (``loss.loss_positions``: the label mask shifted left by one; the last prompt
position predicts the first response token, the last response position predicts nothing).

* ``"response"`` (default, paper): ω^a = mask/n_i (the mean activation over loss positions), ω^g = mask
  (the sum of the gradient there; ℓ_i is already a per-token mean, so the sum is the sample's gradient
  signal). Prompt positions do receive gradient (later tokens attend to them) but are excluded, as the
  paper prescribes; padding gets neither gradient nor weight. An all-masked sample has ā = ĝ = 0, u = 0.
* ``"nonpad"``: the same over every non-padding position (prompt included).
* ``"all"`` (published code): the plain mean over all L positions, padding and prompt included, for
  both a and g.

Scores (``reweight.direction.score``, our options besides the paper's ``dot``): ``cosine`` divides u_i
by the estimate of ‖∇ℓ_i‖ (``sample_norms``); ``layer_cosine`` normalises every site's ā and ĝ first
(``unit_stats``), so u_i = Σ_l Σ_v β_v cos_l(i, v) and every site votes with the same weight.

Weights (paper Eq. 8, ``clipped_weights``): w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ(Σ_j max(u_j, 0))),
with Ren et al.'s δ(a) = 1 if a = 0 else 0: it only turns 0/0 into 0. Here ``weights.delta`` (1e-30) is
the threshold below which the sum counts as 0 (added to the denominator it changes no float64 weight
unless the sum is below ~1e-14). With ``negative="shift"`` (published code, ``shift_negative``)
u ← u − 2·min(u) when min(u) < 0 before normalising (``normalised_weights``). When Σ_j max(u_j, 0) ≤ δ,
Eq. 8 gives w = 0: no update from that batch. Two cases are told apart (``Weights.case``):

* ``"no_signal"``: u ≡ 0 on the valid samples because g ≡ 0 (B = 0 at the first step: g = ∂ℓ/∂z =
  Bᵀ ∂ℓ/∂h = 0). Eq. 8 alone would then never move B; the published code makes step 0 unweighted.
  ``no_signal="unweighted"`` (default) takes one unweighted step (w = 1/B); ``"fallback"`` treats it like
  the next case.
* ``"all_against"``: signal, all against — every u ≤ 0 and some u < 0 (generally: Σ max(u,0) ≤ δ, u ≢ 0).
  ``fallback="skip"`` (default, the paper's Eq. 8): w = 0 and the batch's optimizer step is skipped
  (``Weights.skip``; AdamW's momentum would otherwise move θ on a zero gradient); ``"uniform"`` (our
  option): w = 1/B; ``"zero"`` (the former option): w = 0 and the optimizer step is taken anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metalora.train.loss import loss_positions

POSITIONS = ("response", "nonpad", "all")
VAL_AGGREGATIONS = ("per_sample", "mean")
NEGATIVES = ("clip", "shift")
FALLBACKS = ("skip", "uniform", "zero")
NO_SIGNAL = ("unweighted", "fallback")
CASES = ("eq8", "no_signal", "all_against", "unweighted")

__all__ = [
    "SiteStats",
    "Weights",
    "CASES",
    "clipped_weights",
    "cosine_scores",
    "layer_unit_rows",
    "loss_positions",
    "normalised_weights",
    "position_weights",
    "score_weights",
    "sample_norms",
    "shift_negative",
    "similarity_matrix",
    "similarity_scores",
    "uniform_weights",
    "unit_stats",
    "weight_statistics",
]


# --- positions ----------------------------------------------------------------------------------------


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
    """[B] float64, non-negative; sums to ≈1, or is all zero (``fallback="skip"`` or ``"zero"``)."""
    fallback: bool
    """True when Σ max(u, 0) ≤ δ (or w was set to 1/B regardless of u) and a rule, not Eq. 8's ratio,
    decided the weights."""
    shifted: bool = False
    """True when ``negative="shift"`` moved u by −2·min(u)."""
    case: str = "eq8"
    """``eq8`` (Σ max(u,0) > δ), ``no_signal`` (u ≡ 0), ``all_against`` (Σ max(u,0) ≤ δ, u ≢ 0) or
    ``unweighted`` (w = 1/B whatever u: the published unweighted first step)."""
    skip: bool = False
    """True when the batch's optimizer step is to be skipped (Eq. 8's w = 0 with ``fallback="skip"``)."""


def shift_negative(u: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The published code's u − 2·min(u) over the valid samples when min(u) < 0; (u, whether it moved)."""
    if bool(valid.any()) and float(u[valid].min()) < 0:
        return torch.where(valid, u - 2 * u[valid].min(), u), True
    return u, False


def uniform_weights(valid: torch.Tensor, shifted: bool = False, case: str = "unweighted") -> Weights:
    """w = 1/|valid| on the valid samples (all zero when none is), recorded as a fallback."""
    if bool(valid.any()):
        return Weights(valid.to(torch.float64) / valid.sum(), fallback=True, shifted=shifted, case=case)
    zeros = torch.zeros(valid.shape, dtype=torch.float64, device=valid.device)
    return Weights(zeros, fallback=True, shifted=shifted, case=case)


def normalised_weights(u: torch.Tensor, delta: float, shifted: bool = False) -> Weights:
    """w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ) (Eq. 8) for float64 u; all zero, marked as a fallback,
    when the sum is ≤ δ or not finite."""
    pos = u.clamp(min=0.0)
    total = float(pos.sum())
    if total <= delta or not math.isfinite(total):
        return Weights(torch.zeros_like(u), fallback=True, shifted=shifted)
    return Weights(pos / (total + delta), fallback=False, shifted=shifted)


def score_weights(
    u: torch.Tensor,
    valid: torch.Tensor,
    delta: float,
    shift: bool,
    fallback: str = "skip",
    no_signal: str = "unweighted",
) -> Weights:
    """Eq. 8 on the valid samples, w_i = max(u_i,0) / (Σ_j max(u_j,0) + δ): u is 0 elsewhere, ``shift``
    applies ``shift_negative`` first. When Σ max(u,0) ≤ δ the case decides (module docstring):
    ``no_signal`` (u ≡ 0) with ``no_signal="unweighted"`` gives w = 1/B; otherwise ``fallback``:
    ``skip`` (w = 0, ``skip=True``), ``uniform`` (w = 1/B) or ``zero`` (w = 0, the step is taken)."""
    u = u.to(torch.float64)
    valid = valid.to(u.device)
    u = torch.where(valid, u, torch.zeros_like(u))
    shifted = False
    if shift:
        u, shifted = shift_negative(u, valid)
    w = normalised_weights(u, delta, shifted)
    if not w.fallback:
        return w
    case = "no_signal" if not bool(u.any()) else "all_against"
    if (case == "no_signal" and no_signal == "unweighted") or fallback == "uniform":
        return uniform_weights(valid, shifted, case=case)
    return Weights(w.w, fallback=True, shifted=shifted, case=case, skip=fallback == "skip")


def clipped_weights(
    u: torch.Tensor,
    delta: float = 1e-30,
    negative: str = "clip",
    fallback: str = "skip",
    valid: torch.Tensor | None = None,
    no_signal: str = "unweighted",
) -> Weights:
    """w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ); ``negative="shift"``: u − 2·min(u) when min(u) < 0.

    ``valid`` [B] bool marks samples that have a loss at all; the others always get weight 0 (also under
    the shift and the uniform fallback, which spreads 1 over the valid samples only). ``fallback`` and
    ``no_signal``: ``score_weights``.
    """
    if negative not in NEGATIVES or fallback not in FALLBACKS or no_signal not in NO_SIGNAL:
        raise ValueError(
            f"negative={negative!r} / fallback={fallback!r} / no_signal={no_signal!r}: "
            f"expected {NEGATIVES} / {FALLBACKS} / {NO_SIGNAL}"
        )
    valid = torch.ones_like(u, dtype=torch.bool) if valid is None else valid
    return score_weights(u, valid, delta, negative == "shift", fallback, no_signal)


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
