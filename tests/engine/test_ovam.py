import pytest
import torch
import torch.nn.functional as F

from biasmap_engine import (concept_map, prepare_keys, prepared_token_softmax_maps, sum_upsampled, summed_token_softmax_maps,
                            token_softmax_maps)
from biasmap_engine.ovam import largest_grid


def random_layer(seed, dim=32, ctx=24, heads=4):
    gen = torch.Generator().manual_seed(seed)
    to_q = torch.randn(dim, heads * 8, generator=gen, dtype=torch.float64) * 0.3
    to_k = torch.randn(ctx, heads * 8, generator=gen, dtype=torch.float64) * 0.3
    return to_q, to_k


def test_token_softmax_sums_to_one_per_head_over_attribution_tokens():
    to_q, to_k = random_layer(0)
    hidden = torch.randn(2, 6 * 5, 32, dtype=torch.float64)
    attr = torch.randn(1, 9, 24, dtype=torch.float64)
    for heads in (1, 4):
        maps = token_softmax_maps(hidden @ to_q, attr @ to_k, heads, (6, 5))
        assert maps.shape == (2, 9, 6, 5)
        assert torch.allclose(maps.sum(dim=1), torch.full((2, 6, 5), float(heads), dtype=torch.float64))


def test_maps_with_the_generation_context_as_keys_equal_ordinary_cross_attention_probabilities():
    heads, dim_head = 4, 8
    to_q, to_k = random_layer(1, heads=heads)
    hidden = torch.randn(2, 8 * 8, 32, dtype=torch.float64)
    context = torch.randn(2, 77, 24, dtype=torch.float64)  # every token, padding included
    q, k = hidden @ to_q, context @ to_k
    maps = token_softmax_maps(q, k, heads, (8, 8))
    # Independent route: attention with one-hot values returns the probabilities themselves.
    qh = q.view(2, 64, heads, dim_head).transpose(1, 2)
    kh = k.view(2, 77, heads, dim_head).transpose(1, 2)
    eye = torch.eye(77, dtype=torch.float64).expand(2, heads, 77, 77)
    probs = F.scaled_dot_product_attention(qh, kh, eye)  # [2, heads, 64, 77]
    want = probs.sum(dim=1).transpose(1, 2).reshape(2, 77, 8, 8)
    assert torch.allclose(maps, want, atol=1e-12)


def test_maps_are_computed_in_float32_from_half_precision_queries():
    q = torch.randn(1, 16, 32).half()
    k = torch.randn(1, 5, 32).half()
    assert token_softmax_maps(q, k, 4, (4, 4)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_maps_against_prepared_keys_equal_the_direct_computation(dtype):
    to_q, to_k = random_layer(2)
    q = (torch.randn(3, 6 * 5, 32, dtype=torch.float64) @ to_q).to(dtype)
    k = (torch.randn(1, 9, 24, dtype=torch.float64) @ to_k).to(dtype)
    maps = prepared_token_softmax_maps(q, prepare_keys(k, 4), (6, 5))
    assert maps.shape == (3, 9, 6, 5) and maps.dtype == token_softmax_maps(q, k, 4, (6, 5)).dtype
    assert torch.allclose(maps, token_softmax_maps(q, k, 4, (6, 5)), atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_stage_of_layers_in_one_product_sums_each_layers_maps(dtype):
    gen = torch.Generator().manual_seed(3)
    qs = [torch.randn(2, 6 * 5, 32, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    ks = [torch.randn(1, 9, 32, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    keys = [prepare_keys(k, 4) for k in ks]
    summed = summed_token_softmax_maps(qs, torch.cat(keys), (6, 5))
    each = sum(token_softmax_maps(q, k, 4, (6, 5)) for q, k in zip(qs, ks))
    assert summed.shape == (2, 9, 6, 5) and summed.dtype == each.dtype
    assert torch.allclose(summed, each, atol=1e-12 if dtype == torch.float64 else 1e-5)
    q = torch.randn(2, 30, 32, dtype=torch.float64, requires_grad=True)  # the gradient reaches every layer's queries
    summed_token_softmax_maps([q, q.detach() * 2], torch.cat(keys[:2]).double(), (6, 5))[:, 1].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_wrong_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        token_softmax_maps(torch.randn(1, 15, 8), torch.randn(1, 3, 8), 1, (4, 4))
    with pytest.raises(ValueError, match="grid"):
        prepared_token_softmax_maps(torch.randn(1, 15, 8), prepare_keys(torch.randn(1, 3, 8), 1), (4, 4))


def test_sum_upsampled_resizes_bilinearly_to_the_largest_grid_and_sums():
    small = torch.rand(2, 3, 4, 5)
    large = torch.rand(2, 3, 8, 10)
    total = sum_upsampled([small, large])
    want = F.interpolate(small, size=(8, 10), mode="bilinear", align_corners=False) + large
    assert torch.allclose(total, want)


def test_upsampling_commutes_with_summing_layers_of_one_stage():
    a, b = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4)
    assert torch.allclose(sum_upsampled([a + b], (16, 16)), sum_upsampled([a, b], (16, 16)), atol=1e-6)


def test_concept_map_is_the_mean_of_its_token_pieces():
    maps = torch.rand(2, 7, 3, 3)
    assert torch.allclose(concept_map(maps, [2, 3]), (maps[:, 2] + maps[:, 3]) / 2)
    with pytest.raises(ValueError):
        concept_map(maps, [])


def test_concept_map_of_a_word_occurring_twice_is_the_mean_over_both_occurrences():
    maps = torch.rand(2, 7, 3, 3)
    assert torch.allclose(concept_map(maps, [1, 4]), (maps[:, 1] + maps[:, 4]) / 2)
    assert torch.allclose(concept_map(maps, [1, 2, 5]), (maps[:, 1] + maps[:, 2] + maps[:, 5]) / 3)


def test_the_largest_grid_is_the_one_of_most_pixels_not_the_tallest_first():
    assert largest_grid([torch.zeros(1, 4, 4), torch.zeros(1, 4, 8)]) == (4, 8)
    assert largest_grid([torch.zeros(1, 5, 2), torch.zeros(1, 4, 8)]) == (4, 8)
