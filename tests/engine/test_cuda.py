"""The engine on CUDA: same numbers as on the CPU, and no host synchronisation in what runs every step."""

import pytest
import torch

from biasmap_engine import (TraceRecorder, entanglement_energy, guidance_step, hard_mask, iou, prepare_keys,
                            prepared_token_softmax_maps, soft_topk)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def maps(seed=0, shape=(2, 6, 64, 64)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 40


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_soft_topk_on_cuda_matches_the_cpu(mode):
    m = maps().double()  # paper mode's 20 unconverged iterations amplify fp32 rounding differences between devices
    assert torch.allclose(soft_topk(m.cuda(), mode=mode).cpu(), soft_topk(m, mode=mode), atol=1e-8)


def test_masks_and_iou_on_cuda_match_the_cpu():
    m = maps()
    cpu = iou(hard_mask(m[:, 0]), hard_mask(m[:, 1]))
    assert torch.equal(iou(hard_mask(m[:, 0].cuda()), hard_mask(m[:, 1].cuda())).cpu(), cpu)


def test_a_guided_evaluation_never_synchronises_with_the_host():
    q = torch.randn(2, 32 * 32, 320, device="cuda", requires_grad=True)
    keys = prepare_keys(torch.randn(1, 12, 320, device="cuda"), 8)  # once per run, before the steps
    denoised = torch.randn(2, 4, 32, 32, device="cuda")
    sigma = torch.full((2,), 3.0, device="cuda")
    recorder = TraceRecorder()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device→host copy or sync raises
    try:
        for mode in ("paper", "exact"):
            recorder.begin(sigma[0], torch.zeros((), dtype=torch.long, device="cuda"))
            recorder.add("down_1", prepared_token_softmax_maps(q, keys, (32, 32)))
            energy = entanglement_energy(recorder.current()["down_1"], [([8], [6])], mode=mode)
            (grad_q,) = torch.autograd.grad(energy.sum(), q)
            grad_x = grad_q[:, :64, 0].reshape(2, 4, 4, 4).repeat(1, 1, 8, 8)
            out, norm, status = guidance_step(denoised, grad_x, sigma, 100.0, "skip")
            recorder.end(energy=energy, grad_norm=norm, status=status)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trace = recorder.finish(tokens=["t"] * 12, latent_shape=[2, 4, 32, 32])
    assert trace.maps["down_1"].shape == (2, 2, 12, 32, 32)
    assert torch.isfinite(out).all()
