import numpy as np
import pytest
import torch

from biasmap_engine import hard_mask, iou


def numpy_mask(m, q):
    return m > np.quantile(m, q)


@pytest.mark.parametrize("shape", [(8, 8), (3, 16, 12), (2, 2, 5, 7)])
def test_hard_mask_matches_numpy_quantile_with_strict_greater(shape):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = hard_mask(maps, 0.7).numpy().reshape(-1, *shape[-2:])
    for g, m in zip(got, maps.numpy().reshape(-1, *shape[-2:])):
        np.testing.assert_array_equal(g, numpy_mask(m, 0.7))


def test_hard_mask_with_ties_matches_numpy():
    maps = torch.randint(0, 4, (5, 10, 10), generator=torch.Generator().manual_seed(1)).double()
    for g, m in zip(hard_mask(maps, 0.7).numpy(), maps.numpy()):
        np.testing.assert_array_equal(g, numpy_mask(m, 0.7))


def test_constant_map_has_an_empty_mask_and_iou_zero():
    flat = torch.full((1, 6, 6), 3.0)
    mask = hard_mask(flat)
    assert not mask.any()
    assert iou(mask, mask).item() == 0.0


def test_each_map_gets_its_own_threshold():
    base = torch.rand(6, 6, generator=torch.Generator().manual_seed(2))
    maps = torch.stack([base, base * 100 + 50])
    masks = hard_mask(maps)
    assert torch.equal(masks[0], masks[1])
    assert masks[0].sum() == round(0.3 * 36)


def test_identical_maps_give_iou_one_and_disjoint_top30_give_zero():
    m = torch.rand(4, 10, 10, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(iou(hard_mask(m), hard_mask(m)), torch.ones(4))
    a = torch.zeros(10, 10)
    a[:3] = 1 + torch.rand(3, 10)
    b = torch.zeros(10, 10)
    b[-3:] = 1 + torch.rand(3, 10)
    assert iou(hard_mask(a, 0.7), hard_mask(b, 0.7)).item() == 0.0


def test_iou_counts_intersection_over_union():
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool).view(1, 2, 2)
    b = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool).view(1, 2, 2)
    assert iou(a, b).item() == pytest.approx(1 / 3)


def test_half_precision_maps_threshold_like_float32():
    m = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(4)) * 120
    for dtype in (torch.float16, torch.bfloat16):
        low = m.to(dtype)
        assert torch.equal(hard_mask(low), hard_mask(low.float()))


@pytest.mark.parametrize("q", [-0.1, 1.5, 70])
def test_a_quantile_outside_0_to_1_is_refused_as_a_fraction(q):
    with pytest.raises(ValueError, match=f"q must be a fraction in \\[0, 1\\], got {q}"):
        hard_mask(torch.rand(4, 4), q)


def test_a_quantile_of_0_keeps_every_pixel_above_the_map_minimum_and_1_keeps_none():
    maps = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hard_mask(maps, 0.0), maps > maps.amin(dim=(-2, -1), keepdim=True))
    assert not hard_mask(maps, 1.0).any()
