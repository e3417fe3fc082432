import pytest

from biasmap_engine import BiasMapSettings


@pytest.mark.parametrize("fields, message", [
    ({"branch": "both"}, "branch must be one of"),
    ({"mode": "fast"}, "soft top-k mode must be one of"),
    ({"gate": "none"}, "gate must be one of"),
    ({"keep": 1.0}, "keep must be in"),
    ({"gamma": 0.0}, "gamma must be positive"),
    ({"iters": 0}, "at least one Sinkhorn iteration"),
    ({"scale": -1.0}, "λ must be a number ≥ 0"),
    ({"scale": float("inf")}, "λ must be a number ≥ 0"),  # inf·0 made the skipped images NaN
    ({"start": 0.5, "end": 0.5}, "start = end guides nothing"),
    ({"guided_stages": ("mid_8",)}, "include_middle on"),
])
def test_settings_that_cannot_run_are_refused_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        BiasMapSettings(**fields)


def test_the_defaults_are_the_papers_and_zero_scale_records_only():
    s = BiasMapSettings()
    assert (s.scale, s.branch, s.mode, s.keep, s.gamma, s.iters, s.gate) == (100.0, "uncond", "paper", 0.3, 0.01, 20,
                                                                             "skip")
    assert s.guiding and not BiasMapSettings(scale=0.0).guiding
    assert BiasMapSettings(guided_stages=("down_1",)).to_dict()["guided_stages"] == ["down_1"]
