import re

import pytest

from biasmap_engine import AUDIT_ORDERS, PAPER_PROFESSIONS, audit_run, check_plan


def test_the_default_plan_is_the_papers_19_professions_by_100_seeds_with_its_prompts():
    first = audit_run(0, "\n".join(PAPER_PROFESSIONS))
    assert (first.total, first.subject, first.seed) == (1900, "architect", 0)
    assert first.prompt == "A photo of the face of a architect"  # the reference's template, as it is
    assert first.attribution_prompt == "A photo of the face of a architect and gender"
    assert first.description == "run 0 of runs 0–1899: architect, seed 0"


@pytest.mark.parametrize("order", AUDIT_ORDERS)
def test_every_subject_and_seed_is_run_once_over_the_plan(order):
    runs = [audit_run(i, "doctor\nnurse, pilot", seeds=4, first_seed=10, order=order) for i in range(12)]
    assert sorted((r.subject, r.seed) for r in runs) == sorted(
        (s, seed) for s in ("doctor", "nurse", "pilot") for seed in range(10, 14))
    if order == "seed by seed":  # stopped after any multiple of the subjects, every subject has as many seeds
        assert [(r.subject, r.seed) for r in runs[:4]] == [("doctor", 10), ("nurse", 10), ("pilot", 10),
                                                           ("doctor", 11)]
    else:
        assert [(r.subject, r.seed) for r in runs[:5]] == [("doctor", 10), ("doctor", 11), ("doctor", 12),
                                                           ("doctor", 13), ("nurse", 10)]


def test_the_attribution_prompt_adds_each_demographic_concept_and_subjects_are_read_as_concepts_are():
    run = audit_run(1, " (doctor:1.2),\n\npolice officer ", template="a portrait of a {}, smiling",
                    demographic="gender, race")
    assert (run.subject, run.prompt) == ("police officer", "a portrait of a police officer, smiling")
    assert run.attribution_prompt == "a portrait of a police officer, smiling and gender and race"
    assert run.demographic == "gender, race" and audit_run(0, "(doctor:1.2)").subject == "doctor"


@pytest.mark.parametrize("inputs, message", [
    (dict(run=6, subjects="doctor, nurse", seeds=3),
     r"run 6 is past this audit's 6 runs \(2 subject\(s\) × 3 seed\(s\), runs 0–5\): the pass is complete; set "
     r"run back to 0 .*increment"),
    (dict(run=0, subjects=" \n, "), "no subject to audit: list them"),
    (dict(run=0, subjects="nurse, doctor\nnurse"), "subject\\(s\\) listed twice: nurse; list each once"),
    (dict(run=0, subjects="Doctor\ndoctor"), "subject\\(s\\) listed twice: doctor; .*capitals"),
    (dict(run=0, subjects="doctor", template="A photo of a {profession}"), "has no {} for the subject"),
    (dict(run=0, subjects="doctor", demographic=" "), "no demographic concept: give one"),
    (dict(run=0, subjects="doctor", order="random"), "order must be one of"),
    (dict(run=0, subjects="doctor", seeds=0), "seeds must be at least 1"),
    (dict(run=0, subjects="doctor", first_seed=-3), r"the seeds -3 … 96 leave ComfyUI's seeds"),
    (dict(run=0, subjects="doctor", seeds=2, first_seed=2**64 - 1),
     r"the seeds 18446744073709551615 … 18446744073709551616 leave ComfyUI's seeds \(0 … 18446744073709551615\): "
     r"set first_seed between 0 and 18446744073709551614"),
], ids=["past the end", "no subject", "listed twice", "listed in two cases", "no placeholder", "no demographic",
        "order", "no seeds", "negative seed", "past the largest seed"])
def test_a_plan_that_cannot_run_says_what_to_change(inputs, message):
    with pytest.raises(ValueError, match=message):
        audit_run(**inputs)


def test_the_last_seeds_a_sampler_takes_can_be_audited():
    assert audit_run(1, "doctor", seeds=2, first_seed=2**64 - 2).seed == 2**64 - 1


def test_an_audit_refuses_demographic_concepts_listed_twice_or_sharing_a_subjects_words_before_its_first_run():
    # The sampler would refuse them at the run of each such subject, naming its own concepts, mid-queue.
    with pytest.raises(ValueError, match="demographic concept\\(s\\) listed twice: Gender; list each once"):
        audit_run(0, "doctor", demographic="gender, Gender")
    held = "the subject '{}' and the demographic concept '{}' share words of the attribution prompt 'A photo of {}"
    for subjects, demographic, pair in (("doctor, gender", "gender, female", ("gender", "gender", "a gender and")),
                                        ("doctor, female nurse", "gender, female",
                                         ("female nurse", "female", "a female nurse and gender and female")),
                                        ("doctor, nurse", "male nurse", ("nurse", "male nurse", "a nurse and")),
                                        ("医生, 女医生", "女", ("女医生", "女", "a 女医生 and 女")),  # split by ideograph
                                        # Where the template's words join the subject's: 'a female' and 'female
                                        # doctor' hold neither the other, but overlap in 'a female doctor'.
                                        ("nurse, female doctor", "a female", ("female doctor", "a female",
                                                                              "a female doctor and a female"))):
        with pytest.raises(ValueError, match=re.escape(held.format(*pair))):
            audit_run(0, subjects, template="A photo of a {}", demographic=demographic)
    # The demographic word in the template too: its places and the subject's do not overlap, as the sampler finds.
    assert audit_run(0, "doctor", template="A photo of a woman {}", demographic="woman").demographic == "woman"


def test_an_audit_refuses_demographic_phrases_that_share_a_word_whose_maps_would_mix_before_its_first_run():
    # 'woman' beside 'black woman' would be looked up at both places of 'woman': its map would be of the other's too.
    refused = re.escape("the demographic concepts 'black woman' and 'woman' share a place of the attribution prompt, "
                        "so the map of each would take in the other's: list demographic concepts that the prompt holds "
                        "at separate places (e.g. 'black woman, white woman', not 'black woman, woman')")
    with pytest.raises(ValueError, match=refused):
        audit_run(0, "doctor", demographic="black woman, woman")
    with pytest.raises(ValueError, match=refused):  # the subjects and template linked: the phrases alone tell
        check_plan(demographic="black woman, woman")
    assert audit_run(0, "doctor", demographic="black woman, white woman").demographic == "black woman, white woman"


def test_an_audits_inputs_are_each_checked_where_those_it_needs_are_known():
    from biasmap_engine import check_plan

    assert check_plan(run=0, subjects="doctor, gender", seeds=3) == ["doctor", "gender"]  # demographic linked
    with pytest.raises(ValueError, match="the subject 'gender' and the demographic concept 'gender' share words in a "
                                         "row, .*change the demographic$"):  # the template linked: the two alone
        check_plan(run=0, subjects="doctor, gender", seeds=3, demographic="gender")
    # With the template linked the phrases are read alone: 'female doctor' and 'a female' overlap only in a template's
    # 'a', which the run's check (the sampler's) sees where the queue's could not.
    assert check_plan(run=0, subjects="nurse, female doctor", seeds=1, demographic="a female") == [
        "nurse", "female doctor"]
    with pytest.raises(ValueError, match="the subject 'female doctor' and the demographic concept 'a female' share"):
        check_plan(run=0, subjects="nurse, female doctor", seeds=1, demographic="a female", template="A photo of a {}")
    with pytest.raises(ValueError, match="the pass is complete"):
        check_plan(run=6, subjects="doctor, gender", seeds=3)
    # Subjects linked: the template and the demographic are still checked, and the run's range waits for them.
    with pytest.raises(ValueError, match="has no \\{\\} for the subject"):
        check_plan(run=0, seeds=3, template="A photo of a doctor")
    with pytest.raises(ValueError, match="listed twice: Gender"):
        check_plan(run=10**6, seeds=3, demographic="gender, Gender")
    assert check_plan(run=10**6, seeds=3, demographic="gender") is None
    with pytest.raises(ValueError, match="^run -1 is before this audit's first run: set run to 0 to begin it$"):
        check_plan(run=-1, seeds=3)  # needs no subjects: said when queued (ComfyUI's own minimum is skipped)
