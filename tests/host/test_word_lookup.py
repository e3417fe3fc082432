"""Concept lookup in token strings made by ComfyUI's real SD1 tokenizer (its vocabulary ships with ComfyUI)."""

import pytest
import torch

from biasmap_engine import ConceptNotFoundError, find_word_positions, prompt_words
from biasmap_engine.host import encode_attribution

LONG_WORD = "supercalifragilisticexpialidocious"  # 9 BPE pieces, more than ComfyUI's max_word_length of 8


class TokenizerOnlyClip:
    """What encode_attribution uses of a ComfyUI CLIP, on the real tokenizer; the text encoder is left out, and each
    chunk slot's embedding is its own index."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    def encode_from_tokens(self, tokens):
        slots = sum(len(chunk) for chunk in tokens["l"])
        return torch.arange(slots, dtype=torch.float32).reshape(1, slots, 1)


@pytest.fixture(scope="module")
def clip(comfy):
    from comfy.sd1_clip import SD1Tokenizer

    return TokenizerOnlyClip(SD1Tokenizer())


@pytest.mark.parametrize("prompt, word", [
    ("a " * 70 + f"{LONG_WORD} and gender", LONG_WORD),  # pieces 71-79: 5 in chunk 1, 4 in chunk 2
    ("a " * 70 + f"({LONG_WORD}:1.1) and gender", LONG_WORD),  # a weighted segment of 9 tokens is cut too
    ("a " * 74 + "armadillo and gender", "armadillo"),  # so is a short word inside a long segment (all v0.8.0 prompts)
], ids=["long word", "long weighted word", "short word"])
def test_a_word_cut_at_the_chunk_boundary_is_found_as_its_own_pieces(clip, prompt, word):
    embeddings, tokens = encode_attribution(clip, prompt)
    positions = find_word_positions(tokens, word)
    between = tokens[positions[0]:positions[-1] + 1]
    assert ["<|endoftext|>", "<|startoftext|>"] == [t for t in between if t.startswith("<|")]  # really cut
    assert prompt_words([tokens[p] for p in positions]) == [word] and word in prompt_words(tokens)
    assert embeddings.shape[1] == len(tokens)
    assert find_word_positions(tokens, "gender") == [len(tokens) - 2]


def test_the_cjk_pieces_written_out_in_the_engine_tests_are_the_real_tokenizers(clip):
    bpe = clip.tokenizer.clip_l.tokenizer.tokenize
    per_ideograph = ["ä¸", "Ģ</w>", "ä¸", "ª</w>", "å", "Į", "»</w>", "çĶ", "Ł</w>"]
    assert bpe("一 个 医 生") == per_ideograph
    # transformers 4.x's slow tokenizer without ftfy spaces the ideographs out first; 5.x, and 4.x with ftfy, do not.
    spaced_out = bpe("一个") == bpe("一 个")
    assert bpe("一个医生") == (per_ideograph if spaced_out else ["ä¸", "Ģ", "ä¸", "ª", "å", "Į", "»", "çĶ", "Ł</w>"])


def test_cjk_concepts_are_found_under_either_tokenizers_split_and_validated_as_the_installed_one_splits(clip, pack):
    from biasmap_pack.nodes.concepts import check_concepts

    from biasmap_engine.host import tokenizer_words

    prompt = "一个医生 and gender"
    _, tokens = encode_attribution(clip, prompt)  # transformers 5.x: "一个医生" is one letter run, one word
    # transformers 4.x's slow tokenizer without ftfy first spaces out every ideograph (BasicTokenizer), then BPE
    # encodes each word as the fast tokenizer does: its tokens are those of the spaced-out text.
    _, spaced = encode_attribution(clip, "一 个 医 生 and gender")
    assert len(find_word_positions(tokens, "一个医生")) == len(find_word_positions(spaced, "一个医生")) == 9
    assert prompt_words([spaced[p] for p in find_word_positions(spaced, "医生")]) == ["医", "生"]
    assert check_concepts(prompt, "gender", "一个医生") is True
    # 医生 is two words where the installed tokenizer spaces ideographs out, and part of one elsewhere: the check at
    # queue time says what the run's lookup in the installed tokenizer's tokens finds.
    spaced_out = tokenizer_words("一个医生") == ["一", "个", "医", "生"]
    assert (tokens == spaced) == spaced_out
    assert (check_concepts(prompt, "gender", "医生") is True) == spaced_out
    if not spaced_out:
        with pytest.raises(ConceptNotFoundError):
            find_word_positions(tokens, "医生")
    assert "护士 not in the attribution prompt" in check_concepts(prompt, "gender", "护士")


@pytest.mark.parametrize("prompt, concept, words", [
    ("a photo of a person (elderly) and gender", "person (elderly)", ["person</w>", "elderly</w>"]),
    ("a (doctor:1.2) and gender", "(doctor:1.2)", ["doctor</w>"]),
    (r"a person \(elderly\) and gender", r"person \(elderly\)", ["person</w>", "(</w>", "elderly</w>", ")</w>"]),
], ids=["emphasis", "weight", "escaped brackets"])
def test_a_concept_typed_with_comfyuis_emphasis_finds_the_tokens_the_prompt_gave(clip, prompt, concept, words):
    from biasmap_engine import split_concepts

    _, tokens = encode_attribution(clip, prompt)
    (bare,) = split_concepts(concept)
    assert [tokens[p] for p in find_word_positions(tokens, bare)] == words


def test_a_word_in_single_quotes_or_an_embeddings_name_is_refused_with_the_typing_habit_that_explains_it(clip, pack):
    from biasmap_pack.nodes.concepts import check_concepts

    _, tokens = encode_attribution(clip, "a 'doctor' and gender")
    assert prompt_words(tokens)[:3] == ["a", "'d", "octor"]  # CLIP's contraction 'd
    refused = check_concepts("a 'doctor' and gender", "gender", "doctor")
    assert refused.endswith("remove the single quotes around it.") and "textual-inversion" not in refused
    assert check_concepts("a 'nurse' and gender", "gender", "nurse") is True  # no contraction there
    assert check_concepts("a 'Doctor' and gender", "gender", "doctor").endswith("remove the single quotes around it.")
    from biasmap_engine.host import tokenizer_words

    curly = "a ’doctor’ and gender"  # a word of its own, unless ftfy is installed: it straightens ’ into '
    verdict = check_concepts(curly, "gender", "doctor")
    assert verdict is True if "doctor" in tokenizer_words(curly) else verdict.endswith("remove the single quotes "
                                                                                       "around it.")
    escaped = r"a person \(elderly\) and gender"  # the bracket hint is for a concept typed with brackets only
    assert "escapes its brackets" in check_concepts(escaped, "gender", "(nurse)")
    assert "escapes its brackets" not in check_concepts(escaped, "gender", "nurse")
    assert "escapes its brackets" not in check_concepts("a person (elderly) and gender", "gender", "(nurse)")
    assert "escapes its brackets" not in check_concepts(escaped, "gender", "(person), nurse")  # nurse typed bare
    assert "escapes its brackets" not in check_concepts(escaped, "gender", "(person)；nurse")  # a CJK keyboard's ;
    # A concept typed with brackets, which the prompt escapes: how to type it, as the prompt spells it.
    refused = check_concepts(escaped, "gender", "person (elderly)")
    assert refused.endswith(r"The prompt escapes brackets (person \(elderly\)), which CLIP reads as words of their "
                            r"own between the others: type the concept as the prompt spells it, person \(elderly\).")
    assert "escapes its brackets" not in refused and "in a row" not in refused
    assert check_concepts(escaped, "gender", r"person \(elderly\)") is True
    assert "spells it" not in check_concepts(escaped, "gender", "son (elderly)")  # part of a word: no spelling
    refused = check_concepts("a photo of embedding:mydoc and gender", "gender", "mydoc")
    assert refused.endswith("is no word of the prompt and has no map by name.") and "quotes" not in refused
    assert check_concepts("a photo of embedding:doctor_v2 and gender", "gender", "doctor").endswith("by name.")
    assert "textual-inversion" not in check_concepts("a photo of embedding:mydoc and gender", "gender", "docter")
    refused = check_concepts("a doctor of gender and race", "gender race", "doctor")  # a space, not a comma
    assert refused.endswith("the prompt does not hold 'gender race' in a row: type it as the prompt has it or, in a "
                            "list of concepts, separate them with commas (gender, race).")
    assert "in a row" not in check_concepts("a doctor of gender and race", "gender, age", "doctor")
    assert "in a row" not in check_concepts("a doctor and gender", "gender race", "doctor")  # race is missing
    assert "in a row" not in check_concepts("a doctor and the nurse's gender", "gender", "doctor's")  # one word
    assert "in a row" not in check_concepts("a fire by a fighter and gender", "gender", "fire-fighter")
    assert check_concepts("a doctor of gender and race", "'gender'", "doctor") is True  # the tooltip's quotes


def test_one_concept_typed_with_curly_and_with_straight_quotes_is_one_concept_to_every_check(pack):
    # Both find the same words of a prompt that ftfy straightened: the run would measure a concept against itself.
    from biasmap_pack.nodes.concepts import check_apart

    assert "both hold \"children's\"" in check_apart("children’s", "children's") or \
        "both hold 'children\'s'" in check_apart("children’s", "children's")
    assert check_apart("children’s", "children") is True


def test_a_concept_that_is_part_of_a_prompts_word_is_refused_saying_to_type_the_word_or_write_it_apart(pack):
    # CLIP reads letters, or ideographs, written together as one word: 医生 inside a line typed without spaces.
    from biasmap_pack.nodes.concepts import absent_from, check_concepts

    refused = check_concepts("一张医生的脸的照片，性别", "性别", "医生")
    assert refused.endswith("'医生' is part of the prompt's word '一张医生的脸的照片': CLIP reads letters (or "
                            "ideographs) written together as one word, and a part of a word has no map of its own; "
                            "type the whole word, or write '医生' apart in the attribution prompt, with spaces "
                            "around it.")
    assert check_concepts("一张 医生 的脸的照片，性别", "性别", "医生") is True  # written apart, as the hint says
    assert "'Doctor' is part of the prompt's word 'doctors'" in check_concepts("a photo of doctors and gender",
                                                                               "gender", "Doctor")
    assert "is part of" not in check_concepts("a photo of a doctor and gender", "gender", "nurse")
    # The sampler's note on a semantic concept the picture was not asked for: ideographs typed without spaces ask for
    # it, and so does a plural ("Doctors at work" draws doctors); a longer word of letters may be another concept
    # ("man" in "woman"), and keeps the note.
    assert absent_from(["医生", "doctor", "man", "nurse"], "一张医生的脸的照片 with doctors and a woman") == [
        "man", "nurse"]
    assert absent_from(["nurse", "nanny", "woman", "fire fighter", "chef"],
                       "Nurses, nannies, women and fire fighters at a chefs' table") == []
    assert absent_from(["chef"], "a photo of a chief") == ["chef"]
    assert absent_from(["fireman", "policewoman"], "firemen and policewomen") == []


def test_an_attribution_prompt_holding_clips_end_marker_is_refused_before_the_words_after_it_go_missing(pack):
    from biasmap_pack.nodes.concepts import check_concepts

    assert check_concepts("a doctor <|endoftext|> and gender", "gender", "doctor") == (
        "the attribution prompt holds <|endoftext|>, CLIP's marker of the text's end or start: remove it")


class _DroppingSoftHyphens:
    """The installed tokenizer as transformers 4.x's slow one without ftfy reads text: invisible characters dropped."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, *args, **kwargs):
        return self.inner(text.replace("\xad", ""), *args, **kwargs)

    def tokenize(self, text):
        return self.inner.tokenize(text.replace("\xad", ""))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_check_and_every_lookup_agree_on_a_prompt_the_installed_tokenizer_cleans(clip, pack, monkeypatch):
    # A soft hyphen pasted with a word, which a tokenizer that drops it reads as "doctor": the check reads the prompt
    # as the run's tokens have it, and takes concepts as the sampler and the map nodes look them up in those tokens.
    import biasmap_pack.biasmap_engine.host.attribution as packed
    from biasmap_pack.nodes.concepts import check_concepts

    import biasmap_engine.host.attribution as attribution

    cleaning = _DroppingSoftHyphens(clip.tokenizer.clip_l.tokenizer)
    monkeypatch.setattr(clip.tokenizer.clip_l, "tokenizer", cleaning)  # the CLIP the run encodes with
    for module in (attribution, packed):  # the tests' import of the engine and ComfyUI's import of the pack
        monkeypatch.setattr(module, "_installed_tokenizer", lambda: cleaning)
    prompt = "a doc\xadtor and gender"
    _, tokens = encode_attribution(clip, prompt + " ")  # another cache key than other tests' prompts
    assert check_concepts(prompt, "gender", "doctor") is True
    assert prompt_words([tokens[p] for p in find_word_positions(tokens, "doctor")]) == ["doctor"]
    refused = check_concepts(prompt, "gender", "doc\xadtor")  # as typed, it is no word of the run's tokens either
    assert "its words are: a, doctor, and, gender." in refused
    with pytest.raises(ConceptNotFoundError):
        find_word_positions(tokens, "doc\xadtor")


@pytest.mark.parametrize("subject, demographic, planned", [("color guard", "skin color", True),
                                                          ("female nurse", "female", False),
                                                          ("nurse", "male nurse", False),
                                                          # with the template's words: "a female doctor"
                                                          ("female doctor", "a female", False),
                                                          ("nurse", "face", True)])  # the template's own word
def test_audit_prompts_refuse_a_subject_as_the_sampler_would_on_the_attribution_prompts_tokens(clip, subject,
                                                                                              demographic, planned):
    # Audit Prompts says it when queued, the sampler at the run: the two must agree, or an audit stops mid-queue.
    from biasmap_engine import audit_run, require_distinct_concepts

    prompt = f"A photo of the face of a {subject} and {demographic}"
    _, tokens = encode_attribution(clip, prompt)
    positions = {c: find_word_positions(tokens, c) for c in (subject, demographic)}
    try:
        require_distinct_concepts([demographic], [subject], positions)
        sampled = True
    except ValueError:
        sampled = False
    try:
        audit_run(0, f"doctor, {subject}", demographic=demographic)
        queued = True
    except ValueError:
        queued = False
    assert sampled == queued == planned


def test_a_concept_ending_in_a_final_sigma_passes_validation_as_the_tokenizer_reads_it(pack):
    # CLIP's tokenizers lowercase Σ to σ or ς by version; the word lookup folds the two, so the prompt's word is found.
    from biasmap_pack.nodes.concepts import check_concepts

    assert check_concepts("a photo of a γιατρός and gender", "gender", "γιατρός") is True


def test_a_word_missing_from_a_long_prompt_is_refused_in_a_message_of_readable_length(pack):
    # A prompt of thousands of words quoted and listed whole would bury the fix.
    import itertools

    from biasmap_pack.nodes.concepts import check_concepts

    words = ["".join(letters) for letters in itertools.product("bcdfghjklmn", repeat=3)][:1200]  # each a CLIP word
    prompt = " ".join(words) + " and gender"
    message = check_concepts(prompt, "gender", "doctor")
    assert message.startswith(f"semantic concept(s) doctor not in the attribution prompt {prompt[:300]!r}… "
                              f"({len(prompt)} characters); its words are: bbb, bbc, bbd,")
    assert ", and 1102 more. Add the word to the attribution prompt" in message and len(message) < 1500


def test_a_concept_pasted_with_a_character_that_does_not_show_is_refused_naming_it(pack):
    from biasmap_pack.nodes.concepts import check_concepts

    message = check_concepts("a photo of a doctor and gender", "gender", "doctor\u200b")
    assert message.endswith("'doctor\\u200b' holds a character that does not show, U+200B ZERO WIDTH SPACE, pasted "
                            "with it: type the concept again.")
