"""Guidance under ComfyUI's own model-patching nodes (comfy_extras), as users chain them before the sampler."""

import pytest
import torch
from guided_runs import sample


def _patched(name, model, neg):
    """``model`` through ComfyUI's node ``name`` with typical settings."""
    from comfy_extras import (nodes_apg, nodes_attention_multiply, nodes_cfg, nodes_eps, nodes_freelunch, nodes_fresca,
                              nodes_hypertile, nodes_mahiro, nodes_model_advanced, nodes_model_downscale, nodes_pag,
                              nodes_perpneg, nodes_sag, nodes_tcfg, nodes_tomesd)

    nodes = {
        "FreeU": lambda: nodes_freelunch.FreeU.execute(model, 1.3, 1.4, 0.9, 0.2),
        "FreeU_V2": lambda: nodes_freelunch.FreeU_V2.execute(model, 1.3, 1.4, 0.9, 0.2),
        "FreSca": lambda: nodes_fresca.FreSca.execute(model, 1.0, 1.25, 20),
        "HyperTile": lambda: nodes_hypertile.HyperTile.execute(model, 16, 2, 0, False),
        "TomePatchModel": lambda: nodes_tomesd.TomePatchModel.execute(model, 0.3),
        "PatchModelAddDownscale": lambda: nodes_model_downscale.PatchModelAddDownscale.execute(
            model, 1, 2.0, 0.0, 0.35, True, "bicubic", "bicubic"),
        "PerturbedAttentionGuidance": lambda: nodes_pag.PerturbedAttentionGuidance.execute(model, 3.0),
        "SelfAttentionGuidance": lambda: nodes_sag.SelfAttentionGuidance.execute(model, 0.5, 2.0),
        "APG": lambda: nodes_apg.APG.execute(model, 1.0, 5.0, 0.5),
        "CFGZeroStar": lambda: nodes_cfg.CFGZeroStar.execute(model),
        "CFGNorm": lambda: nodes_cfg.CFGNorm.execute(model, 1.0),
        "TCFG": lambda: nodes_tcfg.TCFG.execute(model),
        "Mahiro": lambda: nodes_mahiro.Mahiro.execute(model),
        "EpsilonScaling": lambda: nodes_eps.EpsilonScaling.execute(model, 1.005),
        "TemporalScoreRescaling": lambda: nodes_eps.TemporalScoreRescaling.execute(model, 0.95, 1.0),
        "RescaleCFG": lambda: nodes_model_advanced.RescaleCFG().patch(model, 0.7),
        "ModelSamplingDiscrete v zsnr": lambda: nodes_model_advanced.ModelSamplingDiscrete().patch(
            model, "v_prediction", True),
        "ModelSamplingDiscrete lcm": lambda: nodes_model_advanced.ModelSamplingDiscrete().patch(model, "lcm", False),
        "UNetSelfAttentionMultiply": lambda: nodes_attention_multiply.UNetSelfAttentionMultiply.execute(
            model, 1.1, 0.9, 1.0, 1.0),
        "UNetCrossAttentionMultiply": lambda: nodes_attention_multiply.UNetCrossAttentionMultiply.execute(
            model, 1.1, 0.9, 1.0, 1.0),
        "PerpNeg": lambda: nodes_perpneg.PerpNeg.execute(model, neg, 1.0),
    }
    with torch.inference_mode():
        return nodes[name]()[0]


@pytest.mark.parametrize("stages", [None, ("down_1",)], ids=["all stages", "down x1"])
@pytest.mark.parametrize("node", [
    "FreeU", "FreeU_V2", "FreSca", "HyperTile", "TomePatchModel", "PatchModelAddDownscale",
    "PerturbedAttentionGuidance", "SelfAttentionGuidance", "APG", "CFGZeroStar", "CFGNorm", "TCFG", "Mahiro",
    "EpsilonScaling", "TemporalScoreRescaling", "RescaleCFG", "ModelSamplingDiscrete v zsnr",
    "ModelSamplingDiscrete lcm", "UNetSelfAttentionMultiply", "UNetCrossAttentionMultiply", "PerpNeg"])
def test_guidance_applies_at_every_step_under_comfyuis_model_patch_nodes(sd15, prompts, node, stages):
    model, clip = sd15
    pos, neg = prompts
    patched = _patched(node, model, neg)
    plain, _, _ = sample(patched, clip, pos, neg, 0.0, steps=2, guided_stages=stages)
    guided, trace, _ = sample(patched, clip, pos, neg, 100.0, steps=2, guided_stages=stages)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)
    counts = trace.guidance_counts()
    assert counts["applied"] == trace.steps.numel() == sum(counts.values()) and set(trace.steps.tolist()) == {0, 1}
