import math

import numpy as np
import pytest
import torch

from biasmap_engine import soft_iou, soft_topk
from biasmap_engine import soft_masks
from biasmap_engine.soft_masks import check_keep


def reference_paper_loop(matrix, percentile=0.3, gamma=0.01, max_iter=20):
    """The reference's soft top-k (the paper's §4, as the authors' code runs it) written out plainly: every row its own log-domain Sinkhorn, g then f, duals from 0."""
    rows = matrix.reshape(-1, matrix.shape[-1])
    out = np.empty_like(rows)
    n = rows.shape[1]
    k = int(n * percentile)
    log_mu = np.full(n, math.log(1.0 / n))
    log_nu = np.log(np.array([n - k, k], dtype=np.float64) / n)

    def lse(a, axis):
        m = a.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)

    for r, x in enumerate(rows):
        s = -np.stack([(x - 0.0) ** 2, (x - 1.0) ** 2], axis=1) / gamma  # [n, 2]
        f, g = np.zeros(n), np.zeros(2)
        for _ in range(max_iter):
            g = log_nu - lse(s + f[:, None], axis=0)
            f = log_mu - lse(s + g[None, :], axis=1)
        out[r] = np.exp(s[:, 1] + f + g[1]) * n
    return out.reshape(matrix.shape)


def test_paper_mode_equals_the_reference_loop_row_by_row_in_float64():
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    got = soft_topk(maps, 0.3, 0.01, mode="paper")
    want = reference_paper_loop(maps.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


def unrolled_loop(maps, keep=0.3, gamma=0.01, iters=20):
    """The reference's loop in torch (g then f, duals from 0), differentiated by autograd through every iteration."""
    x = maps.reshape(-1, maps.shape[-1])
    n = x.shape[-1]
    k = int(n * keep)
    scores = torch.stack([-(x ** 2), -((x - 1.0) ** 2)], dim=-1) / gamma  # [rows, n, 2]
    log_nu = torch.tensor([math.log((n - k) / n), math.log(k / n)], dtype=x.dtype)
    f, g = torch.zeros_like(x), torch.zeros(x.shape[0], 2, dtype=x.dtype)
    for _ in range(iters):
        g = log_nu - torch.logsumexp(scores + f.unsqueeze(-1), dim=1)
        f = -math.log(n) - torch.logsumexp(scores + g.unsqueeze(1), dim=2)
    return (torch.exp(scores[..., 1] + f + g[:, 1:]) * n).reshape(maps.shape)


@pytest.mark.parametrize("gamma, scale, iters", [(0.01, 1.5, 20), (0.2, 1.0, 20), (0.01, 40.0, 20), (0.05, 1.0, 1),
                                                 (0.05, 1.0, 3)])
def test_paper_mode_gradient_equals_autograd_through_the_unrolled_loop(gamma, scale, iters):
    gen = torch.Generator().manual_seed(11)
    maps = (torch.rand(2, 12, 12, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)
    weights = torch.rand(2, 12, 12, generator=gen, dtype=torch.float64)
    got = soft_topk(maps, 0.3, gamma, "paper", iters)
    want = unrolled_loop(maps, 0.3, gamma, iters)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), maps)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), maps)
    assert grad_want.abs().max() > 0
    assert torch.allclose(grad_got, grad_want, rtol=1e-7, atol=1e-9 * grad_want.abs().max().item())


def test_paper_mode_gradient_in_float32_stays_close_to_float64_at_real_map_scales():
    gen = torch.Generator().manual_seed(13)
    maps = torch.rand(2, 4, 64, 64, generator=gen, dtype=torch.float64) * 40
    weights = torch.rand(2, 4, 64, 64, generator=gen, dtype=torch.float64)

    def grad(m):
        m = m.clone().requires_grad_(True)
        return torch.autograd.grad((soft_topk(m, mode="paper") * weights.to(m.dtype)).sum(), m)[0].double()

    want = grad(maps)
    # Autograd through the float32 loop was 1e-2 off here; the recursion's backward keeps float32 near float64.
    assert (grad(maps.float()) - want).abs().max() < 1e-3 * want.abs().max()


def test_paper_mode_gradient_matches_finite_differences():
    maps = (torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: soft_topk(m, 0.5, 0.3, mode="paper"), (maps,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("outlier", [-1000.0, -100.0, 1000.0])
def test_paper_mode_in_float32_follows_float64_on_rows_with_an_outlier(outlier):
    gen = torch.Generator().manual_seed(14)
    maps = torch.rand(2, 64, 64, generator=gen, dtype=torch.float64) * 40
    maps[..., 5] = outlier  # one column far off, negative or large: the first iterate must not cancel its square
    weights = torch.rand(2, 64, 64, generator=gen, dtype=torch.float64)

    def masks_and_grad(m):
        m = m.clone().requires_grad_(True)
        s = soft_topk(m, mode="paper")
        return s.double(), torch.autograd.grad((s * weights.to(m.dtype)).sum(), m)[0].double()

    (want, want_grad), (got, got_grad) = masks_and_grad(maps), masks_and_grad(maps.float())
    assert (got - want).abs().max() < 1e-4
    assert (got_grad - want_grad).abs().max() < 1e-4 * want_grad.abs().max()


@pytest.mark.parametrize("peak", [1e-6, 1e3, 1e6])
@pytest.mark.parametrize("gamma", [0.01, 1e-4])
def test_paper_mode_gives_finite_masks_and_gradients_for_maps_far_beyond_real_scales(peak, gamma):
    maps = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) * peak).requires_grad_(True)
    s = soft_topk(maps, gamma=gamma, mode="paper")
    (grad,) = torch.autograd.grad(soft_iou(s[0], s[1]), maps)
    assert torch.isfinite(s).all() and torch.isfinite(grad).all()


def test_maps_too_small_to_keep_a_pixel_are_refused_with_the_q_that_keeps_one_and_the_exact_mode_where_it_would():
    with pytest.raises(ValueError, match=r"^q = 0\.7 keeps no pixel of a map row 3 wide .*: set q to at most 0\.66, "
                                         r"or set soft_topk to 'exact'"):
        soft_topk(torch.rand(1, 4, 3), keep=0.3, mode="paper")
    with pytest.raises(ValueError, match=r"^q = 0\.9 keeps no pixel of a 2×3 map .*: set q to at most 0\.83$"):
        soft_topk(torch.rand(1, 2, 3), keep=0.1, mode="exact")
    with pytest.raises(ValueError, match=r"a map row 3 wide .*: set q to at most 0\.66$"):  # exact would keep none
        check_keep((2, 3), 0.1, "paper")
    with pytest.raises(ValueError, match=r"a 1×1 map .*: make the image larger$"):  # no q keeps part of one pixel
        check_keep((1, 1), 0.3, "exact")


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_keep_just_below_one_stays_finite_and_the_exact_mode_keeps_all_but_one_pixel(mode):
    # k = ⌊keep·n⌋ = n − 1; the reference's 20 Sinkhorn iterations (paper) do not reach it this close to 1.
    s = soft_topk(torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(6)), 1 - 1e-9, mode=mode)
    assert torch.isfinite(s).all() and ((s >= 0) & (s <= 1 + 1e-6)).all()
    if mode == "exact":
        assert s.sum().item() == pytest.approx(63.0, rel=1e-5)


def test_k_is_the_floor_of_keep_times_n_despite_floating_point_rounding():
    maps = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(5)) * 30
    assert 0.29 * 1600 < 464  # the float product falls just short of the integer
    assert soft_topk(maps, 0.29, mode="exact").sum().item() == pytest.approx(464.0, rel=1e-4)


def test_paper_mode_solves_rows_separately_not_the_whole_map():
    maps = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    maps[0, 0] += 5.0  # a bright row: a global top-k would put all its mass there
    s = soft_topk(maps, mode="paper", iters=500)
    assert torch.allclose(s.sum(-1), torch.full((1, 8), float(int(8 * 0.3)), dtype=torch.float64), rtol=1e-2)


def test_exact_mode_equals_converged_pot_sinkhorn():
    ot = pytest.importorskip("ot", reason="POT (a test extra) is not installed")
    gen = torch.Generator().manual_seed(2)
    maps = torch.rand(2, 12, 12, generator=gen, dtype=torch.float64) * 40
    got = soft_topk(maps, 0.3, 0.01, mode="exact")
    for m, s in zip(maps, got):
        x = (m / m.max()).flatten().numpy()
        n = x.size
        k = int(n * 0.3)
        cost = (x[:, None] - np.array([0.0, 1.0])[None, :]) ** 2
        plan = ot.sinkhorn(np.full(n, 1.0 / n), np.array([n - k, k]) / n, cost, 0.01,
                           method="sinkhorn_log", numItermax=200000, stopThr=1e-13)
        np.testing.assert_allclose(s.flatten().numpy(), n * plan[:, 1], atol=1e-4)


@pytest.mark.parametrize("size", [(8, 8), (64, 64), (40, 56)])
def test_exact_mode_keeps_exactly_k_mass(size):
    maps = torch.rand(3, *size, generator=torch.Generator().manual_seed(3)) * 30
    s = soft_topk(maps, 0.3, mode="exact")
    k = int(size[0] * size[1] * 0.3)
    assert torch.allclose(s.flatten(-2).sum(-1), torch.full((3,), float(k)), rtol=1e-4)


@pytest.mark.parametrize("keep", [0.02, 0.3])
def test_exact_mode_keeps_k_mass_at_the_smallest_gamma_on_nearly_flat_maps(keep):
    # At γ = 1e-4 the logits and the shift are ~1e4, where float32 (spacing 1e-3) would miss Σ S = k by up to 4e-4.
    maps = 1e-3 * torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(5))
    maps[:, 3, 4] = 1e4  # one peak: the rest, near 0 once scaled by it, all get logits of about −1/γ
    s = soft_topk(maps, keep, gamma=1e-4, mode="exact")
    k = math.floor(64 * 64 * keep + 1e-6)
    assert s.dtype == torch.float32 and torch.allclose(s.flatten(-2).sum(-1), torch.full((2,), float(k)), rtol=1e-5)


def test_exact_mode_takes_signed_maps_whose_max_is_not_positive():
    # A difference of two attribution maps may lie at or below zero everywhere; the top pixels are still its largest.
    base = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4))
    for maps in (base - 2.0, base - base.amax()):
        s = soft_topk(maps, 0.3, mode="exact")
        assert s.isfinite().all() and torch.allclose(s.flatten(-2).sum(-1), torch.full((2,), 19.0), rtol=1e-4)
        flat, top = s.flatten(-2), maps.flatten(-2).argmax(-1, keepdim=True)
        assert torch.allclose(flat.gather(-1, top).squeeze(-1), flat.amax(-1))  # the largest pixel kept most
        assert (flat.amax(-1) - flat.amin(-1) > 0.5).all()  # a mask, not the uniform one of a map without signal


@pytest.mark.parametrize("peak", [0.0, 1e-39], ids=["zeros", "below fp32's normal range"])
def test_exact_mode_gives_a_map_without_signal_the_uniform_mask_and_no_gradient(peak):
    # Divided by a floor, such a map sent 1/floor = inf back: the energy's gradient, and the step, were lost.
    maps = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) * peak).requires_grad_(True)
    s = soft_topk(maps, 0.3, mode="exact")
    (s * torch.linspace(0, 1, 64).view(8, 8)).sum().backward()
    assert torch.allclose(s, torch.full_like(s, 19 / 64), rtol=1e-4)
    assert torch.equal(maps.grad, torch.zeros_like(maps))
    faint = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2))
    for scale in (1e-37, 1e-30):  # faint, but at its peak within the normal range: a map as any other
        assert torch.allclose(soft_topk(faint * scale, 0.3, mode="exact"), soft_topk(faint, 0.3, mode="exact"))


def test_exact_mode_gradient_matches_finite_differences():
    maps = (torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5)
    maps.requires_grad_(True)
    # γ large enough that the sigmoid is not saturated everywhere, so the check is informative.
    assert torch.autograd.gradcheck(lambda m: soft_topk(m, 0.3, 0.5, mode="exact"), (maps,), eps=1e-6, atol=1e-6)


def test_exact_mode_gradient_is_implicit_not_zero():
    maps = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_(True)
    target = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (soft_topk(maps, 0.3, 0.2, mode="exact") * target).sum().backward()
    assert maps.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_half_precision_maps_up_to_120_give_finite_masks_and_gradients(dtype, mode):
    maps = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(7)) * 120).to(dtype).requires_grad_(True)
    s = soft_topk(maps, mode=mode)
    assert s.dtype == dtype
    assert torch.isfinite(s).all()
    energy = soft_iou(s[0:1], s[1:2]).sum()
    energy.backward()
    assert torch.isfinite(maps.grad).all()


def test_float64_stays_float64():
    maps = torch.rand(1, 8, 8, dtype=torch.float64)
    assert soft_topk(maps, mode="paper").dtype == torch.float64
    assert soft_topk(maps, mode="exact").dtype == torch.float64


def test_soft_iou_is_one_for_identical_binary_masks_and_zero_for_disjoint():
    a = torch.zeros(1, 4, 4)
    a[0, :2] = 1
    b = torch.zeros(1, 4, 4)
    b[0, 2:] = 1
    assert soft_iou(a, a).item() == pytest.approx(1.0)
    assert soft_iou(a, b).item() == pytest.approx(0.0)
    assert soft_iou(a, (a + b) / 1).item() == pytest.approx(8 / 16)


def test_unknown_mode_and_bad_fractions_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"one of \('paper', 'exact'\), got 'fast'"):
        soft_topk(torch.rand(1, 4, 4), mode="fast")
    with pytest.raises(ValueError, match="keep"):
        soft_topk(torch.rand(1, 4, 4), keep=1.5)


@pytest.mark.parametrize("size", [(16, 16), (64, 64)])
def test_exact_mode_on_a_device_without_float64_solves_in_float32_to_the_same_masks(size, monkeypatch):

    maps = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(5)) * 40
    in_float64 = soft_topk(maps, 0.3, mode="exact")
    assert soft_masks._solve_dtype(torch.device("mps")) == torch.float32  # Apple's MPS has no float64
    monkeypatch.setattr(soft_masks, "_solve_dtype", lambda device: torch.float32)
    in_float32 = soft_topk(maps, 0.3, mode="exact")
    assert torch.allclose(in_float32, in_float64, atol=1e-5)
    k = int(size[0] * size[1] * 0.3)
    assert torch.allclose(in_float32.flatten(-2).sum(-1), torch.full((2, 3), float(k)), rtol=1e-5)


def test_soft_iou_of_fp16_masks_is_computed_in_fp32_where_its_epsilon_is_not_0():
    empty = torch.zeros(1, 8, 8, dtype=torch.float16)
    assert soft_iou(empty, empty).dtype == torch.float32 and soft_iou(empty, empty).item() == 0.0
