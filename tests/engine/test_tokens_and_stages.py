import pytest

from biasmap_engine import (ConceptNotFoundError, clip_words, find_word_positions, listed_words, parse_stages,
                            prompt_words, readable, split_concepts, stage_label, stage_of, typed_form)
from biasmap_engine.tokens import require_distinct_concepts

TOKENS = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "an</w>", "armad", "illo</w>", "and</w>", "gender</w>",
          "<|endoftext|>"]


def test_single_piece_word_is_found_at_its_position():
    assert find_word_positions(TOKENS, "gender") == [8]


def test_multi_piece_word_returns_all_its_pieces():
    assert find_word_positions(TOKENS, "armadillo") == [5, 6]


def test_repeated_word_returns_every_occurrence_and_case_is_ignored():
    assert find_word_positions(["<|startoftext|>", "a</w>", "cat</w>", "and</w>", "a</w>"], "A") == [1, 4]


def test_a_piece_inside_another_word_is_not_a_match():
    with pytest.raises(ConceptNotFoundError):
        find_word_positions(TOKENS, "illo")


def test_missing_word_error_lists_the_prompt_words_and_the_fix():
    with pytest.raises(ConceptNotFoundError, match="photo, of, an, armadillo, and, gender") as err:
        find_word_positions(TOKENS, "doctor")
    assert "Add it to the attribution prompt" in str(err.value)


def test_prompt_words_join_pieces():
    assert prompt_words(TOKENS) == ["a", "photo", "of", "an", "armadillo", "and", "gender"]


def test_split_concepts_drops_blanks():
    assert split_concepts(" woman, man ,, ") == ["woman", "man"]
    assert split_concepts('"doctor.", (nurse), doctors\'') == ["doctor", "nurse", "doctors'"]  # marks around a word
    assert split_concepts("医生。, 「护士」, ¿médico?, doctor…") == ["医生", "护士", "médico", "doctor"]  # any script
    # A Chinese keyboard's commas, and semicolons: separators, not a phrase "man ， woman" with its comma's token.
    assert split_concepts("男人，女人、医生; nurse；(doctor:1.2)") == ["男人", "女人", "医生", "nurse", "doctor"]
    # A list made one per line (a multiline text linked in), and a word in single quotes as the tooltips quote them.
    assert split_concepts("gender\nrace\r\nage") == ["gender", "race", "age"]
    assert split_concepts("gender\rrace") == ["gender", "race"]  # an old Mac's line break
    assert split_concepts("'gender', ‘race’, doctors', 'tis") == ["gender", "race", "doctors'", "'tis"]
    assert split_concepts("'young' 'woman'") == ["'young' 'woman'"]  # quotes around each word, not around the whole


def test_concepts_are_read_without_comfyuis_emphasis_as_its_tokenizer_reads_prompts():
    # ComfyUI's brackets are emphasis, not tokens: "(doctor:1.2)" was looked up as "doctor:1.2" and not found.
    typed = r"(doctor:1.2), (nurse:1e-1), (female) doctor, person (elderly), ((nurse)), \(elderly\) person, person \(elderly\)"
    assert split_concepts(typed) == ["doctor", "nurse", "female doctor", "person elderly", "nurse", "(elderly) person",
                                     "person (elderly)"]  # escaped brackets are the prompt's own tokens
    (weighted,) = split_concepts("(armadillo:1.3).")
    assert find_word_positions(TOKENS, weighted) == find_word_positions(TOKENS, "armadillo.") == [5, 6]
    with pytest.raises(ConceptNotFoundError, match=r"emphasis such as \(word:1.2\) is not part of a concept"):
        find_word_positions(TOKENS, "(armadillo:1.3)")  # the engine's lookup takes words; split_concepts reads syntax


def test_a_concept_typed_in_its_typed_form_is_read_back_as_itself():
    # A trace stores concepts as read; checked again as a list's text, their brackets must not turn into emphasis.
    for concept in ("person (elderly)", "(elderly) person", "doctor", "医生", "doctors'", "a (b) (c)"):
        assert split_concepts(typed_form(concept)) == [concept]


@pytest.mark.parametrize("block, latent, grid, stage", [
    (("input", 1), (64, 64), (64, 64), "down_1"),
    (("input", 4), (40, 56), (20, 28), "down_2"),
    (("input", 7), (65, 47), (17, 12), "down_4"),
    (("middle", 0), (64, 64), (8, 8), "mid_8"),
    (("output", 9), (40, 56), (40, 56), "up_1"),
])
def test_stage_is_read_from_the_real_grid(block, latent, grid, stage):
    assert stage_of(block, latent, grid) == stage


@pytest.mark.parametrize("latent, grid, stage", [
    ((5, 64), (3, 32), "down_2"), ((5, 64), (2, 16), "down_4"),  # a 40-px-high image: heights 3 and 2 both near 5/2²
    ((4, 64), (1, 8), "down_8"),  # SD1.5's deepest level at 32 px high: by its width, not its height of 1
    ((13, 21), (6, 10), "down_2"),  # Deep Shrink's ⌊h/2⌋ at odd sizes, which no level makes: the nearest by area
    ((64, 64), (43, 43), "down_2"),  # Deep Shrink by 1.5: 43² is nearer 32² than 64² by area
])
def test_levels_of_a_latent_a_few_pixels_high_get_stages_of_their_own(latent, grid, stage):
    assert stage_of(("input", 4), latent, grid) == stage


def test_a_grid_several_levels_share_takes_the_stage_the_block_was_built_for():
    # A 16-px image: SD1.5's middle block and its deepest input level both run at 1×1.
    assert stage_of(("middle", 0), (2, 2), (1, 1), built="mid_8") == "mid_8"
    assert stage_of(("input", 7), (2, 2), (1, 1), built="down_4") == "down_4"
    assert stage_of(("input", 7), (64, 64), (32, 32), built="down_4") == "down_2"  # moved by Deep Shrink: the grid


def test_stage_labels_and_parsing():
    assert stage_label("down_2") == "down×½"
    assert parse_stages("down_1, up×1") == ["down_1", "up_1"]
    assert parse_stages("Down_1, UP×½") == ["down_1", "up_2"]  # any case
    assert parse_stages("all") is None
    with pytest.raises(ValueError, match="unknown stage 'down_3'; choose from down_1, down_2"):
        parse_stages("down_3")
    with pytest.raises(ValueError, match="no stage named in ' , '"):  # a typo, not "no stages"
        parse_stages(" , ")
    with pytest.raises(ValueError, match="'all' is every stage, so it goes alone"):  # not "unknown stage 'all'"
        parse_stages("all, down_1")
    assert parse_stages("All,") is None and parse_stages("all, ALL") is None  # as "down_1," and "down_1, down_1"


def test_stages_typed_in_any_order_or_twice_or_as_a_report_writes_them_are_one_choice():
    # One guided configuration, not three in an audit's summary: the U-Net's order, each stage once.
    assert parse_stages("up_1, down×1") == parse_stages("down_1, up_1") == ["down_1", "up_1"]
    assert parse_stages("down×1, down_1") == ["down_1"]
    assert parse_stages("down_1 up_1") == ["down_1", "up_1"]  # as the report and the audit CSV write a subset
    assert parse_stages("up_2,down_2  mid_4") == ["down_2", "mid_4", "up_2"]


def test_stages_are_read_as_a_keyboard_types_the_reports_labels_and_a_near_miss_is_named():
    assert parse_stages("down x1, UP X 1/2") == parse_stages("down×1 up×½") == ["down_1", "up_2"]
    assert parse_stages("down×1/16, mid x 1/8") == ["down_16", "mid_8"]
    with pytest.raises(ValueError, match=r"^unknown stage 'down×2' \(the number after × is the grid's scale: down_2 is "
                                         r"down×½, at 1/2 of the latent\); choose from down_1, .* or name them as the "
                                         r"reports do \(down×1, down×½, …, up×1"):
        parse_stages("down×2")
    with pytest.raises(ValueError, match=r"^unknown stage 'down×2' in 'up_1, down x2' \(the number after × is"):
        parse_stages("up_1, down x2")  # the text as typed, where it was read otherwise
    with pytest.raises(ValueError, match=r"^unknown stage 'up1' \(meant up_1\?\); choose from"):
        parse_stages("up1")
    with pytest.raises(ValueError, match=r"^unknown stage 'down_3'; choose from"):  # no stage it could be
        parse_stages("down_3")


def test_every_divisor_has_a_stage_so_no_recorded_stage_is_dropped():
    from biasmap_engine import STAGE_ORDER

    assert stage_of(("middle", 0), (8, 8), (8, 8)) == "mid_1"
    assert "mid_1" in STAGE_ORDER and STAGE_ORDER.index("down_16") < STAGE_ORDER.index("mid_1") < STAGE_ORDER.index("up_16")


def test_concepts_are_split_into_words_as_clip_splits_them():
    tokens = ["<|startoftext|>", "a</w>", "woman</w>", "'s</w>", "face</w>", ",</w>", "a</w>", "fire</w>", "-</w>",
              "fighter</w>", ".</w>", "<|endoftext|>"]
    assert clip_words("A woman's face, a fire-fighter.") == ["a", "woman", "'s", "face", ",", "a", "fire", "-",
                                                             "fighter", "."]
    assert find_word_positions(tokens, "woman") == [2]
    assert find_word_positions(tokens, "Woman's") == [2, 3]
    assert find_word_positions(tokens, "fire-fighter") == [7, 8, 9]
    assert find_word_positions(tokens, "fighter.") == [9]  # the word's map, not the full stop's: as the nodes read it


def test_words_outside_ascii_are_found_and_shown_as_written():
    doctor_fr = "".join(chr(c) for c in (109, 195, 169, 100, 101, 99, 105, 110))  # "médecin" in the byte alphabet
    tokens = ["<|startoftext|>", "le</w>", doctor_fr[:3], doctor_fr[3:] + "</w>", "<|endoftext|>"]
    assert find_word_positions(tokens, "Médecin") == [2, 3]
    assert prompt_words(tokens) == ["le", "médecin"]
    assert readable(tokens[3]) == "decin</w>" and readable(tokens[2]) == "mé"


def test_words_are_normalised_and_numerals_split_as_clip_does():
    assert clip_words("Cafe\u0301 x² 1990s") == ["café", "x", "²", "1", "9", "9", "0", "s"]


def test_a_greek_final_sigma_matches_either_lowercasing_of_capital_sigma():
    tokens = ["<|startoftext|>", "Î¿Î´Î¿Ïĥ</w>", "<|endoftext|>"]  # "οδοσ" in CLIP's byte alphabet
    assert find_word_positions(tokens, "ΟΔΟΣ") == [1] and find_word_positions(tokens, "οδος") == [1]


# ComfyUI (v0.8.0, comfy/sd1_clip.py) cut "armadillo" at a full chunk: the end of chunk 1 and the start of chunk 2 lie
# between its pieces, as encode_attribution keeps them (padding after the end marker dropped; chunks shortened here).
SPLIT = ["<|startoftext|>", "a</w>", "big</w>", "armad", "<|endoftext|>", "<|startoftext|>", "illo</w>", "and</w>",
         "<|endoftext|>", "<|startoftext|>", "gender</w>", "<|endoftext|>"]


def test_a_word_cut_at_a_chunk_boundary_is_found_without_the_markers():
    assert find_word_positions(SPLIT, "armadillo") == [3, 6]
    assert prompt_words(SPLIT) == ["a", "big", "armadillo", "and", "gender"]


def test_the_piece_after_a_chunk_start_may_be_the_middle_of_a_word():
    with pytest.raises(ConceptNotFoundError):
        find_word_positions(SPLIT, "illo")


def test_a_phrase_across_a_chunk_boundary_is_found():
    assert find_word_positions(SPLIT, "big armadillo and gender") == [2, 3, 6, 7, 10]


# "一个医生" ("a doctor") in CLIP's byte alphabet: 一 = E4 B8 80 → "ä¸Ģ", 个 = E4 B8 AA → "ä¸ª", 医 = E5 8C BB → "åĮ»",
# 生 = E7 94 9F → "çĶŁ". Cut into pieces as CLIP's BPE merges them, checked with ComfyUI's SD1 tokenizer
# (tests/host/test_word_lookup.py): as one word (fast tokenizer; only the last piece ends the word), and as four
# (transformers 4.x's slow tokenizer without ftfy, whose BasicTokenizer spaces out each ideograph: the BPE of
# "一 个 医 生", each ideograph ending in </w>).
DOCTOR_ONE_WORD = ["<|startoftext|>", "ä¸", "Ģ", "ä¸", "ª", "å", "Į", "»", "çĶ", "Ł</w>", "<|endoftext|>"]
DOCTOR_PER_IDEOGRAPH = ["<|startoftext|>", "ä¸", "Ģ</w>", "ä¸", "ª</w>", "å", "Į", "»</w>", "çĶ", "Ł</w>",
                        "<|endoftext|>"]


def test_clip_words_can_split_cjk_ideographs_as_the_slow_tokenizer_does():
    text = "一个医生 a医b ひらがな 𠀀𠀁"
    assert clip_words(text) == ["一个医生", "a医b", "ひらがな", "𠀀𠀁"]  # letter runs, as CLIP's pattern
    assert clip_words(text, split_ideographs=True) == ["一", "个", "医", "生", "a", "医", "b", "ひらがな", "𠀀", "𠀁"]


def test_cjk_words_are_found_under_either_tokenizers_split():
    assert find_word_positions(DOCTOR_ONE_WORD, "一个医生") == list(range(1, 10))
    assert find_word_positions(DOCTOR_PER_IDEOGRAPH, "一个医生") == list(range(1, 10))
    assert find_word_positions(DOCTOR_PER_IDEOGRAPH, "医生") == [5, 6, 7, 8, 9]
    assert prompt_words(DOCTOR_PER_IDEOGRAPH) == ["一", "个", "医", "生"]
    with pytest.raises(ConceptNotFoundError, match="一个医生"):  # the middle of the one word
        find_word_positions(DOCTOR_ONE_WORD, "医生")


@pytest.mark.parametrize("demographic, semantic, message", [
    (["gender"], ["gender"], "share tokens of the attribution prompt"),
    (["gender"], ["doctor and gender"], "share tokens of the attribution prompt"),
    (["gender", "Gender"], ["doctor"], "list each concept once"),
    # The map of 'gender' would take in the place of 'doctor and gender': both of one list, partly one place.
    (["gender"], ["doctor", "doctor and gender"], "the semantic concepts 'doctor' and 'doctor and gender' share a "
                                                  "place of the attribution prompt, so the map of each would take in "
                                                  "the other's: list semantic concepts that the prompt holds at "
                                                  "separate places"),
])
def test_concepts_that_overlap_or_repeat_are_refused(demographic, semantic, message):
    tokens = ["<|startoftext|>", "a</w>", "doctor</w>", "and</w>", "gender</w>", "<|endoftext|>"]
    positions = {w: find_word_positions(tokens, w) for w in (*demographic, *semantic)}
    with pytest.raises(ValueError, match=message):
        require_distinct_concepts(demographic, semantic, positions)
    require_distinct_concepts(["gender"], ["doctor"], positions | {"doctor": [2], "gender": [4]})


def test_a_word_whose_last_piece_ends_the_tokens_is_found():
    assert find_word_positions(["<|startoftext|>", "a</w>", "armad", "illo"], "armadillo") == [2, 3]


def test_a_concept_of_punctuation_alone_is_named_as_empty():
    with pytest.raises(ConceptNotFoundError, match="a concept is empty"):
        find_word_positions(["a</w>"], " . ")


def test_the_prompts_words_are_listed_each_once():
    assert listed_words(["a", "cat", "and", "a", ","]) == "a, cat, and"


def test_the_prompts_words_are_listed_as_concepts_would_be_typed_hyphenated_pairs_and_emoji_too():
    words = clip_words("an African-American doctor 👩‍⚕️ and a non-binary person - portrait.")
    assert listed_words(words) == ("an, african, american, african-american, doctor, 👩\u200d⚕️, and, a, non, binary, "
                                   "non-binary, person, portrait, person-portrait")  # each word alone too
    # A number's digits together, and a chain of hyphens whole: each as typed, it is found.
    words = clip_words("a 40-year-old doctor in 2024")
    assert listed_words(words) == "a, 40, year, old, 40-year-old, doctor, in, 2024"
    tokens = [f"{word}</w>" for word in words]
    for typed in ("40", "40-year-old", "2024", "year"):
        assert find_word_positions(tokens, typed)
    assert listed_words(clip_words("2 doctors")) == "2, doctors" and listed_words(["a", "-"]) == "a"
    # A hyphen joins words only: next to punctuation or at an end it is left out as punctuation is.
    assert listed_words([",", "-", "b"]) == listed_words(["-", "b"]) == "b" and listed_words(["a", "-", ","]) == "a"
    tokens = ["an</w>", "african</w>", "-</w>", "american</w>", "doctor</w>"]
    for typed in ("african-american", "African - American"):  # as listed, or as spaced: CLIP splits both alike
        assert find_word_positions(tokens, typed) == [1, 2, 3]
    with pytest.raises(ConceptNotFoundError):  # what the list showed before: not a phrase of the prompt
        find_word_positions(tokens, "african american")


def test_a_concept_typed_with_curly_quotes_finds_a_prompt_that_ftfy_straightened_and_one_it_did_not():
    from biasmap_engine import covered_words

    straightened = ["the</w>", "children</w>", "'s</w>", "doctor</w>"]  # ftfy installed: ’ read as '
    assert find_word_positions(straightened, "children’s") == [1, 2] == find_word_positions(straightened, "children's")
    as_typed = ["the</w>", "children</w>", "âĢĻ</w>", "s</w>", "doctor</w>"]  # without it: ’ a word of its own
    assert find_word_positions(as_typed, "children’s") == [1, 2, 3]
    assert covered_words("children’s", ["the", "children", "'s", "doctor"]) == {1, 2}
    from biasmap_engine import listed_twice

    assert listed_twice(["children’s", "children's"]) == ["children's"]  # one concept in a straightened prompt


def test_a_concept_is_listed_twice_when_an_earlier_one_has_its_words_as_clip_reads_them():
    from biasmap_engine import listed_twice

    assert listed_twice(["doctor", "Nurse", "DOCTOR", "nurse.", "nurse"]) == ["DOCTOR", "nurse"]
    assert listed_twice(["fire-fighter", "fire fighter", "firefighter"]) == []  # CLIP reads - as a word of its own


def test_a_grid_coarser_than_any_levels_is_filed_under_the_deepest_stage_so_its_trace_loads_back(tmp_path):
    # Kohya Deep Shrink by 9 at input block 3 runs a 512² image's deepest level (down×¼ as built, 16×16) at 2×2.
    import torch

    from biasmap_engine import BiasMapTrace, TraceRecorder
    from biasmap_engine.stages import stage_grid

    deepest = stage_of(("input", 7), (64, 64), (2, 2), built="down_4")
    assert deepest == "down_16" and stage_of(("middle", 0), (64, 64), (1, 1), built="mid_8") == "mid_16"
    recorder = TraceRecorder()
    recorder.begin(torch.tensor(14.6), torch.tensor(0))
    recorder.add("down_1", torch.rand(1, 4, 64, 64))
    recorder.add(deepest, torch.rand(1, 4, *stage_grid(deepest, (64, 64))))
    recorder.end()
    trace = recorder.finish(tokens=["<|startoftext|>", "a</w>", "doctor</w>", "gender</w>"],
                            latent_shape=[1, 4, 64, 64], demographic=["gender"], semantic=["doctor"],
                            model_family="SD15", settings={}, notes=[], run={})
    trace.save(str(tmp_path / "shrunk.safetensors"))
    assert BiasMapTrace.load(str(tmp_path / "shrunk.safetensors")).stages == ["down_1", "down_16"]


def test_a_concept_missing_from_a_prompt_is_explained_by_the_typing_habit_behind_it():
    from biasmap_engine.concept_hints import absent, plurals, why_absent

    words = ["a", "photo", "of", "doctors", "and", "gender"]
    assert absent(["doctor", "gender", "nurse"], words) == ["doctor", "nurse"]
    assert "'doctor' is part of the prompt's word 'doctors'" in why_absent(["doctor"], "a photo of doctors", words)
    assert "remove the single quotes around it" in why_absent(["doctor"], "a photo of 'doctor' and gender", words)
    assert "separate them with commas (gender, photo)" in why_absent(["gender photo"], "a photo of gender", words)
    assert why_absent(["nurse"], "a photo of doctors and gender", words) == ""  # no habit explains it
    assert why_absent(["doctor\u200b"], "a photo of a doctor", ["a", "photo", "of", "a", "doctor"]).endswith(
        "'doctor\\u200b' holds a character that does not show, U+200B ZERO WIDTH SPACE, pasted with it: type the "
        "concept again.")  # pasted from a web page
    assert why_absent(["nurse\u200b"], "a photo of doctors", words) == ""  # missing however typed: nothing to blame
    assert plurals("fireman") == ["firemans", "firemanes", "firemen"] and "women" in plurals("woman")


def test_a_message_lists_a_long_prompts_first_hundred_words_and_how_many_more():
    words = [f"w{i}" for i in range(250)] + ["w0"]  # each once
    assert listed_words(words) == ", ".join(f"w{i}" for i in range(100)) + ", and 150 more"
    assert listed_words(words[:100]).endswith("w98, w99")
