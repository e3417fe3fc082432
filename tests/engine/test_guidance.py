import pytest
import torch

from biasmap_engine import STATUS, entanglement_energy, guidance_step, soft_iou, soft_topk, z_grad_norm


def test_correction_is_lambda_sigma_squared_times_the_x_gradient():
    denoised = torch.zeros(2, 4, 3, 3)
    grad = torch.full((2, 4, 3, 3), 1e-3)
    sigma = torch.tensor([2.0, 0.5])
    out, norm, status = guidance_step(denoised, grad, sigma, scale=10.0, gate="skip")
    assert torch.allclose(out[0], torch.full((4, 3, 3), -10 * 4 * 1e-3))
    assert torch.allclose(out[1], torch.full((4, 3, 3), -10 * 0.25 * 1e-3))
    assert status.tolist() == [STATUS["applied"]] * 2


@pytest.mark.parametrize("sigma", [2.0, torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([2.0, 2.0])],
                         ids=["number", "0-d", "[1]", "[B]"])
def test_one_sigma_is_every_images_and_a_latent_of_any_rank_keeps_its_shape(sigma):
    for shape in ((2, 4, 3, 3), (2, 4, 3), (2, 4, 2, 3, 3)):  # image and video latents
        out, norm, _ = guidance_step(torch.zeros(shape), torch.full(shape, 1e-3), sigma, scale=10.0)
        assert out.shape == shape and norm.shape == (2,)
        assert torch.allclose(out, torch.full(shape, -10 * 4 * 1e-3))
    with pytest.raises(ValueError, match="one value or one per image"):
        guidance_step(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3), torch.ones(3), scale=1.0)


def test_the_energy_refuses_unbatched_maps_rather_than_read_rows_as_images():
    with pytest.raises(ValueError, match=r"\[B, N, H, W\].*maps\[None\]"):
        entanglement_energy(torch.rand(4, 8, 8), [([1], [2])], mode="exact")


def test_gate_norm_is_measured_in_z_space():
    grad = torch.ones(1, 1, 2, 2)  # ‖∇_x‖ = 2
    sigma = torch.tensor([3.0])
    assert torch.allclose(z_grad_norm(grad, sigma), torch.tensor([2 * (10 ** 0.5)]))


def test_skip_gate_leaves_large_gradients_unapplied_and_says_so():
    grad = torch.stack([torch.full((1, 2, 2), 0.01), torch.full((1, 2, 2), 5.0)])
    out, _, status = guidance_step(torch.ones(2, 1, 2, 2), grad, torch.tensor([1.0, 1.0]), 100.0, "skip")
    assert torch.equal(out[1], torch.ones(1, 2, 2))
    assert status.tolist() == [STATUS["applied"], STATUS["skipped_gate"]]


def test_clip_gate_rescales_to_unit_z_norm():
    grad = torch.full((1, 1, 2, 2), 5.0)
    sigma = torch.tensor([1.0])
    out, norm, status = guidance_step(torch.zeros(1, 1, 2, 2), grad, sigma, 1.0, "clip")
    applied_grad = -out / sigma ** 2
    assert torch.allclose(z_grad_norm(applied_grad, sigma), torch.tensor([1.0]))
    assert status.item() == STATUS["clipped"]


def test_clip_gate_leaves_a_gradient_below_unit_norm_as_it_is():
    grad = torch.full((1, 1, 2, 2), 0.01)  # ‖∇_z‖ = 0.02·√2 < 1
    sigma = torch.tensor([1.0])
    clipped, _, status = guidance_step(torch.zeros(1, 1, 2, 2), grad, sigma, 100.0, "clip")
    skipped, _, _ = guidance_step(torch.zeros(1, 1, 2, 2), grad, sigma, 100.0, "skip")
    assert torch.equal(clipped, skipped) and torch.allclose(clipped, -100.0 * grad)
    assert status.item() == STATUS["applied"]


def test_a_gradient_of_exactly_unit_norm_is_gated_as_the_reference_does():
    # The reference applies the update only while ‖∇_z E‖ < 1.
    grad = torch.full((1, 1, 2, 2), 0.5 / 2 ** 0.5)  # ‖∇_x‖ = 1/√2, ‖∇_z‖ = 1 at σ = 1
    sigma = torch.tensor([1.0])
    assert z_grad_norm(grad, sigma).item() == pytest.approx(1.0, abs=1e-7)
    grad = grad / z_grad_norm(grad, sigma).item()  # exactly 1 in float32
    for gate, expected in (("skip", STATUS["skipped_gate"]), ("clip", STATUS["clipped"])):
        assert guidance_step(torch.zeros(1, 1, 2, 2), grad, sigma, 1.0, gate)[2].item() == expected


def test_non_finite_gradient_is_skipped_and_output_stays_finite():
    grad = torch.zeros(2, 1, 2, 2)
    grad[0, 0, 0, 0] = float("nan")
    out, _, status = guidance_step(torch.ones(2, 1, 2, 2), grad, torch.ones(2), 100.0, "clip")
    assert torch.isfinite(out).all()
    assert status.tolist() == [STATUS["skipped_nonfinite"], STATUS["applied"]]


def test_energy_is_the_mean_soft_iou_over_concept_pairs():
    maps = torch.rand(2, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    energy = entanglement_energy(maps, [([1], [3]), ([2], [3])], mode="exact")
    s = soft_topk(maps, mode="exact")
    want = (soft_iou(s[:, 1], s[:, 3]) + soft_iou(s[:, 2], s[:, 3])) / 2
    assert energy.shape == (2,)
    assert torch.allclose(energy, want, atol=1e-6)


def test_energy_of_half_precision_maps_is_computed_in_float32():
    maps = torch.rand(2, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    energy = entanglement_energy(maps.half(), [([1], [3])])
    assert energy.dtype == torch.float32
    # The same fp16 inputs carried in float64 throughout: only the inputs' rounding is shared.
    reference = entanglement_energy(maps.half().double(), [([1], [3])])
    torch.testing.assert_close(energy.double(), reference, rtol=1e-5, atol=0)


def test_the_energy_of_half_precision_soft_maps_keeps_float32_precision_through_its_masks():
    # Maps this flat make soft masks far from 0 and 1, which fp16 would round.
    maps = 1 + torch.rand(2, 5, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.05
    pairs = [([1, 2], [3])]
    energy = entanglement_energy(maps.half(), pairs, gamma=0.5)
    reference = entanglement_energy(maps.half().double(), pairs, gamma=0.5)
    torch.testing.assert_close(energy.double(), reference, rtol=1e-6, atol=0)


def test_a_half_precision_denoised_is_corrected_in_float32_so_a_large_lambda_sigma_squared_does_not_overflow():
    # λ·σ² = 1000 · 14.6² overflows fp16's 65504; the correction itself (about 1 here) does not.
    denoised = torch.full((1, 4, 8, 8), 0.5, dtype=torch.float16)
    grad = torch.full((1, 4, 8, 8), 4e-6)
    out, norm, status = guidance_step(denoised, grad, torch.tensor(14.6), scale=1000.0, gate="skip")
    assert out.dtype == torch.float16 and status.tolist() == [STATUS["applied"]]
    want = (0.5 - 1000.0 * 14.6 ** 2 * 4e-6)
    torch.testing.assert_close(out, torch.full_like(out, want), rtol=1e-3, atol=1e-3)


def test_descending_the_energy_gradient_lowers_the_energy():
    maps = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 5).requires_grad_(True)
    energy = entanglement_energy(maps, [([1], [2])], gamma=0.1, mode="exact")
    (grad,) = torch.autograd.grad(energy.sum(), maps)
    lowered = entanglement_energy(maps.detach() - 0.5 * grad / grad.norm(), [([1], [2])], gamma=0.1, mode="exact")
    assert lowered.item() < energy.item()


def test_a_float64_denoised_keeps_its_precision_and_a_gated_step_leaves_it_exactly():
    gen = torch.Generator().manual_seed(1)
    denoised = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) * 3 + 1e-9
    grad = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    grad[0] *= 1e-3  # ‖∇_z E‖ ≈ 0.02, below the gate; image 1 ≈ 18, above it
    sigma = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out, _, status = guidance_step(denoised, grad, sigma, scale=1e-6, gate="skip")
    assert out.dtype == torch.float64 and status.tolist() == [STATUS["applied"], STATUS["skipped_gate"]]
    assert torch.equal(out[1], denoised[1])
    assert torch.equal(out[0], denoised[0] - 1e-6 * 0.25 * grad[0])


def test_an_image_left_unmoved_keeps_its_values_even_where_lambda_sigma_squared_overflows():
    denoised = torch.tensor([[-0.0, 1.0], [-0.0, 1.0]]).view(2, 2, 1, 1)
    grad = torch.tensor([[-1.0, 1.0], [-1e-3, 0.0]]).view(2, 2, 1, 1)
    sigma = torch.tensor([1e19, 1e19])  # σ² · λ is past fp32's range: inf · 0 made NaN of a gated image
    out, _, status = guidance_step(denoised, grad, sigma, scale=100.0, gate="skip")
    assert status.tolist() == [STATUS["skipped_gate"], STATUS["skipped_gate"]]
    assert torch.equal(out, denoised) and out.signbit().equal(denoised.signbit())
    out, _, _ = guidance_step(denoised, grad, torch.tensor([1.0, 1.0]), scale=0.0)  # λ = 0: bit for bit (−0 too)
    assert out.signbit().equal(denoised.signbit()) and torch.equal(out, denoised)


@pytest.mark.parametrize("line", ["x[0].item()", "bool(x.sum() > 0)", "float(x.sum())", "x.tolist()", "x.cpu()",
                                  "x.numpy()", "torch.tensor([1.0, -1.0])", "x[[0, 2]]", "x[x > 0]", "x.nonzero()"])
def test_the_round_trip_spy_names_each_kind_at_the_engines_line(line):
    # The spy the test below relies on, shown to see what it looks for (code compiled as if in an engine module).
    from host_round_trips import ENGINE, HostRoundTrips

    namespace = {"torch": torch}
    exec(compile(f"def probe(x):\n    return {line}\n", f"{ENGINE}/probe.py", "exec"), namespace)
    with HostRoundTrips() as spy:
        namespace["probe"](torch.randn(4))
    assert spy.found and {where for _, where in spy.found} == {"probe.py:2"}


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("demographic", [[8], [8, 10]], ids=["one word", "a word typed twice"])
def test_a_guided_evaluation_makes_no_host_round_trip_on_any_device(mode, demographic):
    """What tests/engine/test_cuda.py checks with CUDA's sync debug mode, seen by operator on the CPU too."""
    from host_round_trips import HostRoundTrips

    from biasmap_engine import TraceRecorder, prepare_keys, prepared_token_softmax_maps

    q = torch.randn(2, 16 * 16, 64, requires_grad=True)
    keys = prepare_keys(torch.randn(1, 12, 64), 4)  # once per run, before the steps
    denoised, sigma = torch.randn(2, 4, 16, 16), torch.full((2,), 3.0)
    recorder = TraceRecorder()
    with HostRoundTrips() as spy:
        recorder.begin(sigma[0], torch.zeros((), dtype=torch.long))
        recorder.add("down_1", prepared_token_softmax_maps(q, keys, (16, 16)))
        energy = entanglement_energy(recorder.current()["down_1"], [(demographic, [6])], mode=mode)
        (grad_q,) = torch.autograd.grad(energy.sum(), q)
        out, norm, status = guidance_step(denoised, grad_q[:, :, :4].reshape(2, 4, 16, 16), sigma, 100.0)
        recorder.end(energy=energy, grad_norm=norm, status=status)
    assert spy.found == []


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_a_guided_evaluation_keeps_every_tensor_on_the_latents_device(mode):
    """On the CPU every tensor shares one device, so a tensor the engine made on the host would pass unseen; on the
    meta device (shapes only, no values) it meets the others and raises, as it would on a GPU, and so does any read
    of a value."""
    from biasmap_engine import TraceRecorder, prepare_keys, prepared_token_softmax_maps

    device = torch.device("meta")
    q = torch.randn(2, 16 * 16, 64, device=device, requires_grad=True)
    keys = prepare_keys(torch.randn(1, 12, 64, device=device), 4)
    denoised, sigma = torch.randn(2, 4, 16, 16, device=device), torch.full((2,), 3.0, device=device)
    recorder = TraceRecorder()
    for step in range(2):
        recorder.begin(sigma[0], torch.tensor(step, device=device))
        recorder.add("down_1", prepared_token_softmax_maps(q, keys, (16, 16)), weight=torch.ones(2, 1, 16, 16,
                                                                                               device=device))
        energy = entanglement_energy(recorder.current()["down_1"], [([8], [6]), ([8, 10], [6])], mode=mode)
        (grad_q,) = torch.autograd.grad(energy.sum(), q)
        for gate in ("skip", "clip"):
            out, norm, status = guidance_step(denoised, grad_q[:, :, :4].reshape(2, 4, 16, 16), sigma, 100.0, gate)
        recorder.end(energy=energy, grad_norm=norm, status=status)
    assert {t.device for t in (out, norm, status, energy)} == {device}
    assert (out.shape, status.dtype) == (denoised.shape, torch.int8)
