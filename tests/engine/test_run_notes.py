"""The notes a run's trace carries: none where there is nothing to say, each naming its figures and fix."""

from biasmap_engine.run_notes import (emphasis_note, gate_note, quality_note, skipped_steps_note,
                                      unevaluated_steps_note, unweighted_note)


def test_a_run_with_nothing_to_note_gets_no_note():
    assert [emphasis_note([]), quality_note(399.0), unweighted_note(None, "the negative prompt's, branch uncond"),
            skipped_steps_note([]), unevaluated_steps_note([]), gate_note({}),
            gate_note({"applied": 3, "clipped": 2, "skipped_gate": 0})] == [None] * 7


def test_each_note_names_what_it_found():
    assert emphasis_note([("doctor", 1.5), ("gender", 1.1 * 1.1)]).startswith(
        "the attribution prompt weights 'doctor' ×1.5, 'gender' ×1.21 (ComfyUI's emphasis)")
    long = emphasis_note([("masterpiece " * 20, 1.2)] * 4)  # a whole prompt in brackets: quoted by its start
    assert f"{('masterpiece ' * 20)[:60]!r}… ×1.2" in long and " and more (ComfyUI's emphasis)" in long
    assert quality_note(400.0).startswith("λ 400 is at or above 400") and "λ 1000 is" in quality_note(1000.0)
    assert "(the positive prompt's, branch cond) weighs nothing on part" in unweighted_note(
        "part", "the positive prompt's, branch cond")
    assert "weighed nothing on the image" in unweighted_note("all", "the positive prompt's, branch cond")
    assert "sampler step(s) 2, 5:" in skipped_steps_note([2, 5]) and "step(s) 3 without" in unevaluated_steps_note([3])
    assert gate_note({"not_guided": 4, "applied": 1, "skipped_gate": 2, "skipped_nonfinite": 1}).startswith(
        "the gate left 2 of 4 guided (evaluation, image) pair(s) unguided")
