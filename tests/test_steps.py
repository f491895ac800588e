"""Step segmentation and answer extraction on fixed texts (no model)."""

import pytest

from sage.steps import extract_answer, normalize_number, option_texts, problem_kind, problem_options, segment_steps


def texts(text):
    return [(text[s.start : s.end], s.kind) for s in segment_steps(text)]


def test_numbered_lines_are_steps():
    text = "1. There are 3 boxes.\n2. Each has 12 eggs, so 3 * 12 = 36.\n3. 36 - 7 = 29.\nThe answer is 29."
    got = texts(text)
    assert [t for t, _ in got] == [
        "1. There are 3 boxes.",
        "2. Each has 12 eggs, so 3 * 12 = 36.",
        "3. 36 - 7 = 29.\nThe answer is 29.",
    ]
    assert {k for _, k in got} == {"numbered"}


def test_step_prefix_and_bullets():
    got = texts("Step 1: add 2 and 3.\nStep 2: double it.\n\n- first\n- second")
    assert [t for t, _ in got] == ["Step 1: add 2 and 3.", "Step 2: double it.", "- first", "- second"]


def test_sentences_split_but_not_decimals():
    got = texts("The price is 3.5 dollars per pen. Four pens cost 14 dollars! So we pay 14.")
    assert [t for t, _ in got] == [
        "The price is 3.5 dollars per pen.",
        "Four pens cost 14 dollars!",
        "So we pay 14.",
    ]
    assert {k for _, k in got} == {"sentence"}


def test_sentence_ending_in_a_number():
    got = texts("We divide 40 by 20. 40 / 20 = 2. So she gets 2, e.g. two coins.")
    assert [t for t, _ in got] == ["We divide 40 by 20.", "40 / 20 = 2.", "So she gets 2, e.g. two coins."]


def test_unnumbered_lines_are_steps():
    got = texts("10 bags x 10 cookies = 100 cookies\nOmar has 100 cookies")
    assert got == [("10 bags x 10 cookies = 100 cookies", "sentence"), ("Omar has 100 cookies", "sentence")]


def test_blank_line_blocks_and_single_sentence_block():
    got = texts("First we add.\n\nThen we multiply by two and get 10")
    assert got == [("First we add.", "block"), ("Then we multiply by two and get 10", "block")]


def test_think_sections():
    text = "<think>Let me see. 2 + 2 = 4.</think>\nThe answer is 4."
    got = texts(text)
    assert got[0] == ("Let me see.", "think")
    assert got[1] == ("2 + 2 = 4.", "think")
    assert got[-1] == ("The answer is 4.", "block")


def test_spans_index_the_text():
    text = "  1. a b c\n\n  2. d e f  \n"
    for s in segment_steps(text):
        assert text[s.start : s.end].strip() == text[s.start : s.end]
        assert s.end > s.start


@pytest.mark.parametrize(
    "raw,want",
    [("$1,200.00", "1200"), ("-3.50", "-3.5"), ("3/4", "3/4"), ("42.", "42"), ("no", None), ("0.0", "0")],
)
def test_normalize_number(raw, want):
    assert normalize_number(raw) == want


@pytest.mark.parametrize(
    "text,value",
    [
        ("1. 3 * 12 = 36\n2. 36 - 7 = 29\nThe answer is 29.", "29"),
        ("So she earned $10. The final answer is $1,250.", "1250"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("Thus \\boxed{17} is it, not 18", "17"),
        ("He has 5 apples, then 7 apples, ending with 9", "9"),
        ("<think>maybe 5? no, 6</think> Answer: 6", "6"),
        ("Answer: -4.50 degrees", "-4.5"),
    ],
)
def test_extract_number(text, value):
    found = extract_answer(text)
    assert found.kind == "number"
    assert found.value == value
    assert normalize_number(text[found.start : found.end]) == value


def test_extract_none():
    found = extract_answer("I do not know.")
    assert found.kind == "none" and found.value is None


AQUA = "A train runs 60 km in 1.5 hours. Speed? Options: A)30 B)40 C)50 D)60 E)90"


def test_problem_options():
    assert problem_options(AQUA) == ["A", "B", "C", "D", "E"]
    assert problem_options("What is 2 + 2?") == []


@pytest.mark.parametrize(
    "text,value",
    [
        ("60 / 1.5 = 40 km/h. The answer is B.", "B"),
        ("Speed is 40.\nAnswer: (B) 40", "B"),
        ("So the correct option is D", "D"),
        ("60/1.5 = 40 so B", "B"),
    ],
)
def test_extract_option(text, value):
    found = extract_answer(text, AQUA)
    assert found.kind == "option"
    assert found.value == value
    assert text[found.start : found.end].strip("() ") == value


# --- answers a person can judge: none where none was given --------------------------

def test_a_cut_off_chain_has_only_stated_answers():
    # "What is 6 times 7?" with -n 60 stopped at "which gives us": 7 is not its answer
    text = "To find 6 times 7, we multiply 6 by 7, which gives us"
    assert extract_answer(text, "What is 6 times 7?", complete=False).value is None
    assert extract_answer(text, "What is 6 times 7?").value == "7"  # a finished text keeps the fallback
    stated = text + " 42. The answer is 42"
    assert extract_answer(stated, "What is 6 times 7?", complete=False).value == "42"


@pytest.mark.parametrize("text", [
    "We add the numbers.\n1. First add 20 and 4.\n2.",  # the next item had just begun
    "We add the numbers.\n1. First add 20 and 4.\n2. ",
    "Step 1: add 20 and 4.\nStep 2:",
])
def test_list_numbers_are_never_the_answer(text):
    found = extract_answer(text, "What is 20 + 4?")
    assert found.value not in ("2", "\n2") and found.value == "4", found
    assert "\n" not in (found.value or "") and found.text == found.text.strip()


def test_values_are_stripped():
    found = extract_answer("The total is\n2", "What is 1 + 1?")
    assert found.value == "2" and found.text == "2"
    assert normalize_number("$ 12") == "12" and normalize_number("\n7") == "7"


KMH = "A car drives 90 km in 2 hours. What is its speed? Options: A) 40 km/h B) 42 km/h C) 45 km/h D) 50 km/h E) 55 km/h"


def test_option_texts():
    assert option_texts(KMH) == {"A": "40 km/h", "B": "42 km/h", "C": "45 km/h", "D": "50 km/h", "E": "55 km/h"}
    assert option_texts(AQUA)["B"] == "40" and option_texts("What is 2 + 2?") == {}


def test_an_option_letter_that_contradicts_its_text_is_flagged():
    found = extract_answer("90 / 2 = 45 km/h. The answer is D) 45 km/h", KMH)
    assert found.value == "D" and found.note is not None
    assert "D" in found.note and "50 km/h" in found.note and "option C" in found.note
    # the letter and its value agree, or no value is written: no note
    assert extract_answer("The answer is C) 45 km/h", KMH).note is None
    assert extract_answer("The answer is D.", KMH).note is None
    # a value that is no option's: nothing to say it contradicts
    assert extract_answer("The answer is D) 47 km/h", KMH).note is None


@pytest.mark.parametrize("problem,kind", [
    ("Why is the sky blue?", "open"),
    ("Who wrote Hamlet?", "open"),
    ("What is 6 times 7?", "number"),
    ("What is six times seven?", "number"),
    ("How many legs does a spider have?", "number"),
    (KMH, "option"),
    ("", "number"),
])
def test_problem_kind(problem, kind):
    assert problem_kind(problem) == kind


def test_open_questions_have_no_extracted_answer():
    text = "The sky looks blue because air scatters short wavelengths, about 4 times more than red."
    found = extract_answer(text, "Why is the sky blue?")
    assert found.value is None and found.kind == "none"


def test_an_option_letter_against_the_value_worked_out_is_flagged():
    # the chain computed 45 km/h (option C), then answered D) 50 km/h
    text = "Average speed = 90 km / 2 hours = 45 km/h\n\nSo the answer is D) 50 km/h"
    found = extract_answer(text, KMH)
    assert found.value == "D" and found.note is not None and "worked out 45" in found.note
    assert "option C" in found.note
    assert extract_answer("90 / 2 = 45 km/h, so the answer is C", KMH).note is None
    # options the chain restates are not values it worked out
    restated = "The options are A) 40 km/h B) 42 km/h C) 45 km/h D) 50 km/h E) 55 km/h. 90/2 = 50. The answer is D"
    assert extract_answer(restated, KMH).note is None
    assert extract_answer("A) 40 km/h B) 42 km/h C) 45 km/h D) 50 km/h E) 55 km/h. The answer is D", KMH).note is None
