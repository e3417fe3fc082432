"""Differentiable top-k masks and SoftIoU, the energy BiasMap guidance descends (BiasMap §4).

The soft top-k is the entropic optimal-transport relaxation of Xie et al., "Differentiable Top-k with Optimal
Transport" (NeurIPS 2020): the uniform measure on the n scores is transported to two anchors y = (0, 1) with masses
((n−k)/n, k/n) under the cost (x − y)² and regulariser γ; the soft mask is n·Γ[:, 1].

Two modes:
- ``paper`` reproduces the authors' code: 20 log-domain Sinkhorn iterations from zero duals (g then f), gradients
  of the unrolled loop, raw maps, and each *row* of a map solved as its own problem (k = ⌊keep·W⌋ per row).
- ``exact`` solves one global problem per map on max-normalised maps. With two anchors the optimum is
  S_i = σ((2x_i − 1)/γ + c) for the scalar c with Σ S = k; c is found by grid search and differentiated implicitly.
"""

import math

import torch

__all__ = ["MODES", "check_keep", "check_soft_topk", "soft_topk", "soft_iou"]

MODES = ("paper", "exact")  # the reference's row-wise Sinkhorn, the converged global solve; default first

# Four rounds of a 64-point grid shrink the bracket, max − min of the logits (2/γ times the normalised maps' range:
# ≤ 400 at γ 0.01, ≤ 4e4 at the nodes' smallest γ, 1e-4), to 64⁻⁴ ≈ 6e-8 of it (≤ 2.4e-5 at γ 0.01); Newton finishes.
_GRID, _ROUNDS, _NEWTON = 64, 4, 2


def soft_topk(maps: torch.Tensor, keep: float = 0.3, gamma: float = 0.01, mode: str = "paper",
              iters: int = 20) -> torch.Tensor:
    """Soft top-``keep`` masks of ``[..., H, W]`` maps by entropic OT (Xie et al. 2020), in the input dtype."""
    check_soft_topk(keep, gamma, mode, iters)
    # fp16 overflows in exp/logsumexp for map values above ≈ 25 (the reference's NaN energies); compute in fp32+.
    work = maps if maps.dtype == torch.float64 else maps.float()
    out = _sinkhorn_rows(work, keep, gamma, iters) if mode == "paper" else _exact_global(work, keep, gamma)
    return out.to(maps.dtype)


def check_soft_topk(keep: float, gamma: float, mode: str, iters: int) -> None:
    """Refuse soft top-k arguments no map can take (the settings check them when made, before any sampling)."""
    if mode not in MODES:
        raise ValueError(f"soft top-k mode must be one of {MODES}, got {mode!r}")
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if mode == "paper" and iters < 1:  # the exact mode iterates to convergence: iters is not its
        raise ValueError(f"paper mode needs at least one Sinkhorn iteration, got iters={iters}; set iters to 1 or "
                         f"more (the reference uses 20)")


def check_keep(hw: tuple[int, int], keep: float, mode: str) -> None:
    """Refuse a ``keep`` that leaves no pixel of ``hw`` maps in ``mode``: before any map is made, not at a step."""
    n, what = (hw[-1], f"a map row {hw[-1]} wide") if mode == "paper" else (hw[0] * hw[1], f"a {hw[0]}×{hw[1]} map")
    if _count(n, keep) < 1:
        exact_fits = mode == "paper" and _count(hw[0] * hw[1], keep) >= 1
        fixes = ([f"set q to at most {math.floor((1 - 1 / n) * 100) / 100:g}"] if n > 1 else []) + (
            ["set soft_topk to 'exact' (one problem per map, not per row)"] if exact_fits else []) or [
            "make the image larger"]  # a map of one pixel: no soft top-k keeps part of it
        raise ValueError(f"q = {1 - keep:g} keeps no pixel of {what} (the soft top-k keeps ⌊(1 − q)·{n}⌋): "
                         + ", or ".join(fixes))


def soft_iou(s_a: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """Σ S_a S_b / (Σ S_a + Σ S_b − Σ S_a S_b + 1e-8) per map pair over the last two dims, in fp32 or wider (the 1e-8
    is 0 in fp16)."""
    s_a, s_b = (s if s.dtype == torch.float64 else s.float() for s in (s_a, s_b))
    inter = (s_a * s_b).flatten(-2).sum(-1)
    return inter / (s_a.flatten(-2).sum(-1) + s_b.flatten(-2).sum(-1) - inter + 1e-8)


def _sinkhorn_rows(maps: torch.Tensor, keep: float, gamma: float, iters: int) -> torch.Tensor:
    """The reference's log-domain Sinkhorn, applied to every row of every map (its ``view(rows, -1)`` quirk)."""
    x = maps.reshape(-1, maps.shape[-1])  # one problem per row
    n = x.shape[-1]
    check_keep(maps.shape[-2:], keep, "paper")
    k = _count(n, keep)
    return _RowSinkhorn.apply(x, k, gamma, iters).reshape(maps.shape)


class _RowSinkhorn(torch.autograd.Function):
    """The reference's unrolled Sinkhorn loop as a recursion on one number per row, with its exact backward.

    With two anchors every dual pair (f, g) after the first update is fixed by d = g₁ − g₀, the loop is

        d₁ = logit(k/n) + LSE(s₀) − LSE(s₁),   d ← d + logit(k/n) − log Σ σ(a + d) + log Σ σ(−a − d),

    with s_j = −(x − j)²/γ and a = s₁ − s₀ = (2x − 1)/γ, and the output n·Γ[:, 1] is σ(a + d). This is the same
    function as the reference's 20 iterations (same numbers to rounding), but its backward is a handful of batched
    kernels over the saved d's instead of autograd through every iteration: a GPU at SD sizes is launch-bound, and
    nothing per iteration is kept for the backward but one number per row. The sums of sigmoids need no log-sum-exp:
    each term is in (0, 1) and each sum in (0, n), out of underflow's reach for finite rows (a floor keeps the
    logarithm finite anyway), so an iteration launches eight kernels where the log-sum-exps took 16–18.
    """

    @staticmethod
    def forward(ctx, x, k, gamma, iters):
        n = x.shape[-1]
        logit = math.log(k / (n - k))
        a = (2.0 * x - 1.0) / gamma
        t0, t1, shift = _anchor_scores(x, gamma)
        d = logit + shift + torch.logsumexp(t0, -1, keepdim=True) - torch.logsumexp(t1, -1, keepdim=True)
        ds = [d]
        both, signs = torch.stack([a, -a]), x.new_ones(2, 1, 1)
        signs[1:].fill_(-1.0)  # on the device: a tensor of Python numbers would be a blocking copy from the host
        tiny = torch.finfo(x.dtype).tiny
        for _ in range(iters - 1):
            # log Σ σ(z) and log Σ σ(−z), z = a + d, in one batch of both signs.
            log_mass = torch.sigmoid(torch.addcmul(both, d, signs)).sum(-1, keepdim=True).clamp_min_(tiny).log_()
            d = d + (logit - log_mass[0] + log_mass[1])
            ds.append(d)
        ctx.gamma = gamma
        ctx.save_for_backward(x, torch.stack(ds))
        return torch.sigmoid(a + d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, ds = ctx.saved_tensors  # ds: [iters, rows, 1]
        gamma = ctx.gamma
        a = (2.0 * x - 1.0) / gamma
        s = torch.sigmoid(a + ds[-1])
        grad_z = grad_out * s * (1 - s)
        grad_a = grad_z
        grad_d = grad_z.sum(-1, keepdim=True)  # adjoint of the last d
        if ds.shape[0] > 1:
            # Step t maps d_t to d_t+1 with ∂d_t+1/∂z = −w and ∂d_t+1/∂d_t = 1 − Σw, where z = a + d_t and
            # w = σ(z)σ(−z)·(1/Σσ(z) + 1/Σσ(−z)); all steps at once.
            z = a + ds[:-1]
            s_pos, s_neg = torch.sigmoid(z), torch.sigmoid(-z)
            tiny = torch.finfo(x.dtype).tiny
            w = s_pos * s_neg * (1 / s_pos.sum(-1, keepdim=True).clamp_min(tiny)
                                 + 1 / s_neg.sum(-1, keepdim=True).clamp_min(tiny))
            factors = 1 - w.sum(-1, keepdim=True)  # [iters − 1, rows, 1]
            # Adjoint of d_t+1 for every step t: the last adjoint times the factors of the steps after t.
            after = torch.cat([factors[1:], torch.ones_like(factors[:1])]).flip(0).cumprod(0).flip(0)
            grad_next = grad_d * after
            grad_a = grad_a - (grad_next * w).sum(0)
            grad_d = grad_next[0] * factors[0]  # adjoint of d₁
        # d₁ = logit + LSE(s₀) − LSE(s₁); softmaxes are shift-free, so of the shifted scores, as in the forward.
        t0, t1, _ = _anchor_scores(x, gamma)
        grad_d1 = (torch.softmax(t0, -1) * x - torch.softmax(t1, -1) * (x - 1.0)) * (-2.0 / gamma)
        return grad_a * (2.0 / gamma) + grad_d * grad_d1, None, None, None


def _anchor_scores(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anchors' scores s_j = −(x − j)²/γ, each less its row maximum −m_j²/γ (m_j = min |x − j|), and
    (m₁² − m₀²)/γ = LSE(s₀) − LSE(s₁) − (LSE(t₀) − LSE(t₁)).

    Written as products (|x − j| − m_j)(|x − j| + m_j), so large or signed maps do not cancel squares in float32.
    """
    scores, minima = [], []
    for anchor in (0.0, 1.0):
        distance = (x - anchor).abs()
        nearest = distance.amin(-1, keepdim=True)
        scores.append((distance - nearest) * (distance + nearest) / -gamma)
        minima.append(nearest)
    m0, m1 = minima
    return scores[0], scores[1], (m1 - m0) * (m1 + m0) / gamma


def _exact_global(maps: torch.Tensor, keep: float, gamma: float) -> torch.Tensor:
    """Converged global soft top-k: S = σ((2x − 1)/γ + c) with Σ S = k, on maps divided by their largest |value|."""
    flat = maps.flatten(-2)
    n = flat.shape[-1]
    check_keep(maps.shape[-2:], keep, "exact")
    k = _count(n, keep)
    # By the largest magnitude, not the max: attribution maps are ≥ 0, where the two agree, but a signed map (a
    # difference of maps) with max ≤ 0 would be scaled to ±huge values and the sum's solve to NaN.
    largest, tiny = flat.abs().amax(-1, keepdim=True), torch.finfo(flat.dtype).tiny
    # A map of zeros (or of values below the dtype's normal range) has no top pixels: a uniform S and no gradient,
    # where dividing by a floor would send 1/floor (inf in fp32) back to the map. (Just above that range the gradient,
    # about 1/max, still overflows fp32, up to maps of about 1e-37: a step then skipped as non-finite, and counted.)
    x = torch.where(largest >= tiny, flat / largest.clamp_min(tiny), 0.0)
    logits = (2.0 * x - 1.0) / gamma
    return _SigmoidWithSum.apply(logits, float(k)).view(maps.shape)


class _SigmoidWithSum(torch.autograd.Function):
    """S = σ(a + c(a)) with c chosen so that Σ S = k; the backward is the implicit-function gradient."""

    @staticmethod
    def forward(ctx, logits, k):
        wide = _solve_dtype(logits.device)
        shift = _solve_shift(logits.detach().to(wide), k)
        # a + c in the solve's dtype: at γ = 1e-4 both are ~1e4, where fp32's spacing (1e-3) would miss Σ S = k.
        s = torch.sigmoid(logits.to(wide) + shift).to(logits.dtype)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad_out):
        (s,) = ctx.saved_tensors
        slope = s * (1 - s)
        # dc/da_j = −σ'_j / Σσ', so the VJP removes the slope-weighted mean of the incoming gradient.
        mean = (grad_out * slope).sum(-1, keepdim=True) / slope.sum(-1, keepdim=True).clamp_min(1e-30)
        return slope * (grad_out - mean), None


def _solve_dtype(device: torch.device) -> torch.dtype:
    """float64 for the exact mode's solve, except on Apple's MPS, which has none (float32 converges there too)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _solve_shift(logits: torch.Tensor, k: float) -> torch.Tensor:
    """The c with Σ σ(a + c) = k: grid search (in float64 where the device has it) on a bracket that provably
    contains it, then Newton.

    Each round evaluates the sum at 64 shifts at once and keeps the cell where it crosses k, shrinking the bracket
    64-fold; Newton steps from inside the final cell then converge quadratically. Fixed counts: no host
    synchronisation, a few dozen kernel launches in all.
    """
    n = logits.shape[-1]
    target = math.log(k / (n - k))  # logit(k/n)
    # With c = target − max(a) every term is ≤ k/n (sum ≤ k); with c = target − min(a) every term is ≥ k/n.
    lo = target - logits.amax(-1, keepdim=True)
    hi = target - logits.amin(-1, keepdim=True)
    steps = torch.linspace(0.0, 1.0, _GRID + 1, dtype=logits.dtype, device=logits.device)
    tiny = torch.finfo(logits.dtype).tiny
    for _ in range(_ROUNDS):
        shifts = lo + (hi - lo) * steps  # [..., GRID + 1]
        sums = torch.sigmoid(logits.unsqueeze(-2) + shifts.unsqueeze(-1)).sum(-1)  # [..., GRID + 1]
        below = (sums <= k).sum(-1, keepdim=True).clamp(1, _GRID)  # sums rise with the shift
        lo, hi = shifts.gather(-1, below - 1), shifts.gather(-1, below)
    shift = 0.5 * (lo + hi)
    for _ in range(_NEWTON):
        s = torch.sigmoid(logits + shift)
        step = (s.sum(-1, keepdim=True) - k) / (s * (1 - s)).sum(-1, keepdim=True).clamp_min(tiny)
        shift = (shift - step).clamp(lo, hi)
    return shift


def _count(n: int, keep: float) -> int:
    """k = ⌊keep·n⌋ < n, robust to keep's rounding (0.29 · 1600 is 463.99… in floating point)."""
    return min(math.floor(n * keep + 1e-6), n - 1)
