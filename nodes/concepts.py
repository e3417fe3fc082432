"""The concept inputs (attribution prompt, demographic and semantic lists, single-word inputs) and their checks:
before the graph runs, against the words the installed CLIP tokenizer reads in the typed prompt, and at run time,
where a linked input's text is known."""

from comfy_api.latest import io

from ..biasmap_engine import (ConceptNotFoundError, covered_words, find_word_positions, is_ideographic,
                              listed_twice, listed_words, prompt_words, quote_forms, split_concepts, typed_concepts)
from ..biasmap_engine.concept_hints import absent, plurals, why_absent, word_holding
from ..biasmap_engine.host import prompt_text_words
from ..biasmap_engine.tokens import overlap_refusal, overlapping
from .prompt_graph import WordsAsked

__all__ = ["absent_from", "check_apart", "check_concepts", "check_listed_once", "check_loaded_trace_words",
           "check_single", "check_stood_for", "check_words_asked", "concept_inputs", "first_concept", "one_concept",
           "require"]

_DEFAULT_ATTRIBUTION = "A photo of the face of a doctor and gender"


def concept_inputs() -> list:
    """The attribution prompt and the two concept lists."""
    return [
        io.String.Input("attribution_prompt", default=_DEFAULT_ATTRIBUTION, multiline=True,
                        tooltip="Text whose words get maps (OVAM): usually the generation prompt plus the demographic "
                                "word. Words need not be in the generation prompt. Encoded with the CLIP input."),
        io.String.Input("demographic", default="gender",
                        tooltip="Demographic concept word(s), comma-separated; each must occur in the attribution "
                                "prompt (paper: 'gender' or 'race')."),
        io.String.Input("semantic", default="doctor",
                        tooltip="Semantic concept word(s), comma-separated; each must occur in the attribution "
                                "prompt (paper: the profession)."),
    ]


def check_concepts(attribution_prompt, demographic, semantic) -> bool | str:
    """Validation before the graph runs: both concept lists non-empty and made of words of the attribution prompt.

    The prompt's words are the installed CLIP tokenizer's, as the run's tokens are: its text clean-up depends on the
    installed transformers and ftfy (see tokenizer_words).
    """
    if attribution_prompt is None:  # linked from another node: checked by BPE lookup at run time
        return True
    marker = next((m for m in ("<|endoftext|>", "<|startoftext|>") if m in attribution_prompt), None)  # as CLIP
    if marker:  # CLIP's own marker: the text's words after it are no words of the encoded prompt
        return f"the attribution prompt holds {marker}, CLIP's marker of the text's end or start: remove it"
    try:
        words = prompt_text_words(attribution_prompt)
    except ValueError as err:
        return str(err)
    shown = listed_words(words)
    if not shown:
        return (f"the attribution prompt {_quoted(attribution_prompt)} has no words: type the text whose words get "
                f"maps, e.g. '{_DEFAULT_ATTRIBUTION}'")
    lists = {}
    for label, value in (("demographic", demographic), ("semantic", semantic)):
        if value is None:
            continue
        concepts = lists[label] = split_concepts(value)
        if not concepts:
            return (f"the {label} concept list is empty; type at least one word of the attribution prompt "
                    f"({shown})")
        missing = absent(concepts, words)
        if missing:
            bracketed = {concept for typed, concept in typed_concepts(value) if "(" in typed}
            return (f"{label} concept(s) {', '.join(missing)} not in the attribution prompt "
                    f"{_quoted(attribution_prompt)}; its words are: {shown}. Add the word to the "
                    f"attribution prompt or choose one of these."
                    + why_absent(missing, attribution_prompt, words, bracketed))
    return _check_distinct(lists, words)


def check_words_asked(asked: list[WordsAsked], attribution_prompt: str) -> None:
    """Before a sampler samples: the words that the nodes reading its trace ask for (``prompt_graph.words_asked_of``)
    are words of its attribution prompt, and a node's two concepts share none of them. Those nodes run after the
    sampler, and cannot see the prompt before it runs: a typo there would cost the whole run."""
    try:
        words = prompt_text_words(attribution_prompt)  # once, for every node that asks
    except ValueError:  # a prompt ComfyUI's tokenizer would refuse: the sampler's own check of it says so
        return
    _check_present(asked, words, attribution_prompt)
    _check_pairs_apart(asked, words, attribution_prompt)


def check_loaded_trace_words(asked: list[WordsAsked], loaded: dict) -> None:
    """Before a sampler samples: the words that a node measures in its trace and in another chosen in Load Trace
    (``loaded``: by node id, that trace's file and its header, as the sampler reads them for
    ``prompt_graph.words_asked_of``) are words of that trace too. That node runs after the sampler, which the mistake
    would cost."""
    for words_asked in asked:
        if words_asked.node_id not in loaded:  # no trace from Load Trace, or none readable: Load Trace says why
            continue
        file, header = loaded[words_asked.node_id]
        missing = [word for word in split_concepts(words_asked.text) if not _found(header.tokens, word)]
        if missing:
            stands_for = f" ({words_asked.stands_for})" if words_asked.stands_for else ""
            raise ValueError(f"{words_asked.node} (node {words_asked.node_id}) measures {words_asked.input} "
                             f"{', '.join(map(repr, missing))}{stands_for} in this sampler's trace and in the trace "
                             f"'{file}' from Load Trace, whose attribution prompt lacks "
                             f"{'it' if len(missing) == 1 else 'them'} (its words: "
                             f"{listed_words(prompt_words(header.tokens))}): measure a word that both traces have, or "
                             f"choose another trace in Load Trace. Checked before sampling, so that the run is not "
                             f"lost to it.")


def _found(tokens: list[str], word: str) -> bool:
    try:
        return bool(find_word_positions(tokens, word))
    except ConceptNotFoundError:
        return False


def _check_present(asked: list[WordsAsked], words: list[str], attribution_prompt: str) -> None:
    for words_asked in asked:
        missing = absent(split_concepts(words_asked.text), words)
        if missing:
            node, name, stands_for = words_asked.node, words_asked.input, words_asked.stands_for
            fix = (f"type in its {name} input a word of both prompts" if stands_for else
                   f"correct its {name} input")
            raise ValueError(f"{node} (node {words_asked.node_id}) asks for {name} {', '.join(map(repr, missing))}"
                             + (f" ({stands_for})" if stands_for else "")
                             + f", which is not a word of this sampler's attribution prompt "
                             f"{_quoted(attribution_prompt)} "
                             f"(its words: {listed_words(words)}): {fix}, or add "
                             f"the word to the attribution prompt. Checked before sampling, so that the run is not "
                             f"lost to it.{why_absent(missing, attribution_prompt, words)}")


def _check_pairs_apart(asked: list[WordsAsked], words: list[str], attribution_prompt: str) -> None:
    """No node measures a concept_a against a concept_b on the same words of the prompt (the run refuses it)."""
    for a in asked:
        for b in asked:
            if (a.node_id, a.input, b.input) != (b.node_id, "concept_a", "concept_b"):
                continue
            shared = next(((x, y) for x in split_concepts(a.text) for y in split_concepts(b.text)
                           if covered_words(x, words) & covered_words(y, words)), None)
            if shared:
                told = [f"{w.input} {concept!r}" + (f" ({w.stands_for})" if w.stands_for else "")
                        for w, concept in zip((a, b), shared)]
                raise ValueError(f"{a.node} (node {a.node_id}) measures {told[0]} against {told[1]}, which share "
                                 f"words of this sampler's attribution prompt {_quoted(attribution_prompt)}: a "
                                 f"concept's overlap with itself is 1 whatever the image. Type in concept_a a "
                                 f"demographic word and in concept_b a semantic word that do not overlap. Checked "
                                 f"before sampling, so that the run is not lost to it.")


def _quoted(prompt: str) -> str:
    """A prompt as a message quotes it: whole, or its start where it is long (a message of the whole would bury its
    fix)."""
    if len(prompt) <= _QUOTED_AT_MOST:
        return repr(prompt)
    return f"{prompt[:_QUOTED_AT_MOST]!r}… ({len(prompt)} characters)"


_QUOTED_AT_MOST = 300


def absent_from(concepts: list[str], text: str) -> list[str]:
    """The concepts that are not words of ``text`` (a ComfyUI prompt), as the run looks them up, nor, for ideographs,
    part of one (医生 in a line typed without spaces: the picture is still of it; "man" in "woman" is not)."""
    try:
        words = prompt_text_words(text)
    except ValueError:  # a prompt ComfyUI's tokenizer would refuse: not this check's to judge
        return []
    return [concept for concept in absent(concepts, words)
            if not (is_ideographic(concept) and word_holding(concept, words))
            and not any(covered_words(plural, words) for plural in plurals(concept))]


def _check_distinct(lists: dict, words: list[str]) -> bool | str:
    """No concept listed twice, no two concepts of a list and no demographic and semantic concept on the same words of
    the prompt (the run checks the tokens again)."""
    for label, concepts in lists.items():
        twice = next(iter(listed_twice(concepts)), None)
        if twice is not None:
            return f"the {label} concept '{twice}' is listed twice: list each concept once"
        shared = overlapping(concepts, words)
        if shared is not None:
            return overlap_refusal(label, *shared)
    for a in lists.get("demographic", []):
        for b in lists.get("semantic", []):
            if covered_words(a, words) & covered_words(b, words):
                return (f"the demographic concept '{a}' and the semantic concept '{b}' share words of the attribution "
                        f"prompt, and a concept's overlap with itself is 1 whatever the image: give them words that "
                        f"do not overlap")
    return True


def check_listed_once(**inputs) -> bool | str:
    """Validation (and run-time check) of comma-separated word inputs: no word twice, as CLIP reads it (lower case),
    which would log or measure the same pair twice."""
    for name, text in inputs.items():
        twice = next(iter(listed_twice(split_concepts(text or ""))), None)
        if twice is not None:
            return (f"{name}: '{twice}' is listed twice (CLIP reads capitals as lower case and spaces as one): list "
                    f"each word once")
    return True


def check_apart(concept_a, concept_b) -> bool | str:
    """Validation (and run-time check) of a node's two concept inputs: no concept in both, as CLIP reads it, whose
    overlap with itself would be 1 whatever the image (words shared in the attribution prompt are refused by the
    sampler, which has it, before it samples)."""
    a, b = (split_concepts(text) if isinstance(text, str) else [] for text in (concept_a, concept_b))
    in_a = {form for concept in a for form in quote_forms(concept)}
    both = next((concept for concept in b if quote_forms(concept) & in_a), None)
    if both is not None:
        return (f"concept_a and concept_b both hold '{both}' (CLIP reads capitals as lower case and spaces as one), "
                f"whose overlap with itself is 1 whatever the image: type in concept_a a demographic word and in "
                f"concept_b a semantic one")
    return True


def check_stood_for(trace, pairs: list[tuple[str, str]], concept_a: str, concept_b: str, every: bool,
                    baseline=None) -> None:
    """At run time, where an empty input stands for the trace's concepts (its first, or ``every`` one): no pair shares
    words of the trace's attribution prompt (or the ``baseline``'s, where they are measured too), said naming the
    empty input, as the check before sampling does; the measurement's own message would name a word the user never
    typed in the node."""
    empty = {"concept_a": not split_concepts(concept_a), "concept_b": not split_concepts(concept_b)}
    if not any(empty.values()):
        return
    measured_in = baseline if baseline is not None else trace
    for pair in pairs:
        if set(measured_in.positions(pair[0])) & set(measured_in.positions(pair[1])):
            told = [f"{name} {word!r}" + (f" ({'a' if every else 'the first'} {label} concept of the trace, as {name} "
                                          f"is empty)" if empty[name] else "")
                    for (name, label), word in zip((("concept_a", "demographic"), ("concept_b", "semantic")), pair)]
            whose = "the trace's" if baseline is None else "the baseline's"
            raise ValueError(f"{told[0]} and {told[1]} share words of {whose} attribution prompt, and a "
                             f"concept's overlap with itself is 1 whatever the image: type in concept_a a demographic "
                             f"word and in concept_b a semantic word that do not overlap")


def check_single(fix: str, **inputs) -> bool | str:
    """Validation (and run-time check) of inputs that take one concept each: a comma-separated list, which the
    sampler's concept inputs take, would be looked up as one phrase, commas and all, and measured without a word."""
    for name, text in inputs.items():
        words = split_concepts(text) if text is not None else []
        if len(words) > 1:
            return f"{name} holds several concepts ({', '.join(words)}) but takes one: {fix}"
    return True


def require(verdict: bool | str) -> None:
    """A validation's verdict (``check_single``, ``check_listed_once``) at run time, where a linked input's text is
    known: its message raised."""
    if verdict is not True:
        raise ValueError(verdict)


def one_concept(text: str) -> str:
    """The concept typed in an input that takes one (see check_single), as the sampler's lists take their words
    (without the sentence marks around it: 'doctor,' is 'doctor'); '' when none is typed."""
    return next(iter(split_concepts(text)), "")


def first_concept(concepts: list[str], label: str, input_name: str) -> str:
    """What an empty concept input ``input_name`` stands for: the trace's first ``label`` concept."""
    if not concepts:
        raise ValueError(f"the trace has no {label} concept, which an empty '{input_name}' stands for: type a word "
                         f"of its attribution prompt in '{input_name}'")
    return concepts[0]
