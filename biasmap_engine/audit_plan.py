"""An audit over subjects × seeds, one queued run each, as the paper's protocol (BiasMap §1).

The paper audits 19 professions × 100 seeds with the prompt "A photo of the face of a {profession}" and the
attribution prompt "… and gender". In ComfyUI an audit is a queue of runs: a run number that the frontend increments
after each queued prompt picks the subject and the seed, so one graph queued with a batch count walks the whole plan.
"""

from dataclasses import dataclass

from .tokens import clip_words, covered_words, listed_twice, overlap_refusal, overlapping, split_concepts

__all__ = ["AUDIT_ORDERS", "PAPER_PROFESSIONS", "AuditRun", "audit_run", "check_plan"]

PAPER_PROFESSIONS = ("architect", "artist", "athlete", "cashier", "chef", "doctor", "driver", "engineer",
                     "firefighter", "journalist", "lawyer", "mechanic", "musician", "nurse", "officer", "pilot",
                     "scientist", "teacher", "waiter")
# "seed by seed" runs every subject at a seed before the next seed: an audit stopped early is still balanced.
AUDIT_ORDERS = ("seed by seed", "subject by subject")
_LARGEST_SEED = 0xFFFFFFFFFFFFFFFF  # a KSampler's


@dataclass(frozen=True)
class AuditRun:
    """Run ``index`` of ``total``: its subject (the semantic concept), seed and prompts."""

    index: int
    total: int
    subject: str
    seed: int
    prompt: str
    attribution_prompt: str
    demographic: str

    @property
    def description(self) -> str:
        """Which run this is, of how many, with its subject and seed."""
        return f"run {self.index} of runs 0–{self.total - 1}: {self.subject}, seed {self.seed}"


def audit_run(run: int, subjects: str, template: str = "A photo of the face of a {}",
              demographic: str = "gender", seeds: int = 100, first_seed: int = 0,
              order: str = "seed by seed") -> AuditRun:
    """The subject and seed of queued run number ``run`` over ``subjects`` (one per line, or comma-separated) ×
    ``seeds`` seeds from ``first_seed``; the prompt is ``template`` with the subject for ``{}``, the attribution prompt
    that prompt " and " the demographic concept(s)."""
    names = check_plan(run=run, subjects=subjects, seeds=seeds, template=template, demographic=demographic)
    if order not in AUDIT_ORDERS:
        raise ValueError(f"order must be one of {AUDIT_ORDERS}, got {order!r}")
    if not 0 <= first_seed <= _LARGEST_SEED - (seeds - 1):
        raise ValueError(f"the seeds {first_seed} … {first_seed + seeds - 1} leave ComfyUI's seeds (0 … "
                         f"{_LARGEST_SEED}): set first_seed between 0 and {_LARGEST_SEED - (seeds - 1)}")
    if order == "seed by seed":
        subject, seed = names[run % len(names)], first_seed + run // len(names)
    else:
        subject, seed = names[run // seeds], first_seed + run % seeds
    demographics = split_concepts(demographic)
    return AuditRun(run, len(names) * seeds, subject, seed, template.replace("{}", subject),
                    _attribution_prompt(template, subject, demographics), ", ".join(demographics))


def _attribution_prompt(template: str, subject: str, demographics: list[str]) -> str:
    """A run's attribution prompt: its prompt, then " and " and the demographic concepts."""
    return f"{template.replace('{}', subject)} and {' and '.join(demographics)}"


def check_plan(*, run: int | None = None, subjects: str | None = None, seeds: int | None = None,
               template: str | None = None, demographic: str | None = None) -> list[str] | None:
    """:func:`audit_run`'s checks of an audit's inputs, each where the inputs it needs are given (None: not known
    yet, e.g. linked), before a queue of runs starts; → the subjects, where given."""
    names = _subjects(subjects) if subjects is not None else None
    if template is not None and "{}" not in template:
        raise ValueError(f"the template {template!r} has no {{}} for the subject: write it where the subject goes, "
                         f"e.g. 'A photo of the face of a {{}}'")
    if demographic is not None:
        _check_demographics(split_concepts(demographic), names or [], template)  # a template without {}: refused above
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if run is not None and run < 0:
        runs = f" (runs 0–{len(names) * seeds - 1})" if None not in (names, seeds) else ""
        raise ValueError(f"run {run} is before this audit's first run: set run to 0 to begin it{runs}")
    if None in (run, names, seeds):
        return names
    total = len(names) * seeds
    if run >= total:
        raise ValueError(f"run {run} is past this audit's {total} runs ({len(names)} subject(s) × {seeds} seed(s), "
                         f"runs 0–{total - 1}): the pass is complete; set run back to 0 for the next (λ = 0 for the "
                         f"guided pass's baselines, or another audit), with its control after generate on increment "
                         f"(randomize would pick runs at random)")
    return names


def _subjects(subjects: str) -> list[str]:
    names = [s for line in subjects.splitlines() for s in split_concepts(line)]
    if not names:
        raise ValueError("no subject to audit: list them one per line (or comma-separated), e.g. doctor, nurse")
    twice = listed_twice(names)
    if twice:
        raise ValueError(f"subject(s) listed twice: {', '.join(dict.fromkeys(twice))}; list each once (its runs "
                         f"would be repeated; CLIP reads capitals as lower case and spaces as one)")
    return names


def _check_demographics(demographics: list[str], subjects: list[str], template: str | None) -> None:
    if not demographics:
        raise ValueError("no demographic concept: give one, e.g. gender or race (comma-separated for several)")
    twice = listed_twice(demographics)
    if twice:
        raise ValueError(f"demographic concept(s) listed twice: {', '.join(dict.fromkeys(twice))}; list each once")
    # The map of 'woman' beside 'black woman' would be of both places of 'woman': the phrases' own words tell, whatever
    # the subjects and template (each may be linked).
    for split in (False, True):
        shared = overlapping(demographics, clip_words(" and ".join(demographics), split))
        if shared is not None:
            raise ValueError(overlap_refusal("demographic", *shared))
    # The sampler looks each concept up as a phrase at every place of the attribution prompt, and refuses a subject and
    # a demographic concept whose places overlap (a concept's overlap with itself is 1, whatever the image): here in
    # the attribution prompt of each subject's run (of the subject alone where the template is linked), read as CLIP
    # reads it either way (a tokenizer may split CJK text by ideograph). Said before the first run, not by the
    # sampler at the run of each.
    for subject in subjects:
        prompt = _attribution_prompt(template or "{}", subject, demographics)
        for split in (False, True):
            words = clip_words(prompt, split)
            held = covered_words(subject, words)
            demographic = next((d for d in demographics if held & covered_words(d, words)), None)
            if demographic is not None:
                where = f"of the attribution prompt '{prompt}'" if template else "in a row"
                raise ValueError(f"the subject '{subject}' and the demographic concept '{demographic}' share words "
                                 f"{where}, so the two would be one place of it, and every subject is measured "
                                 f"against the demographic: take '{subject}' out of the subjects, or change the "
                                 f"demographic{' concept or the template' if template else ''}")
