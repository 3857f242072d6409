"""`trainer.envs.answers.final_number`: the forms real models write their answer in, one table per
form, one row each: plain, self-corrected, checked, after reasoning, in LaTeX."""

import pytest

from trainer.envs.addition import Addition
from trainer.envs.answers import final_number, without_reasoning


@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("579", "579"),  # the tiny model's form: the number alone
        ("579<|im_end|>", "579"),
        (" 579.", "579"),
        ("12 3", "12"),  # a leading number wins over later noise (what the tiny model is scored on)
        ("The answer is 579.", "579"),
        ("the answer: 579", "579"),
        ("Answer = 579", "579"),
        ("123 + 456 = 579", "579"),  # the result, not the first operand
        ("First 100 + 23 = 123, then 123 + 456 = 579.", "579"),
        ("Step 1: 6*7\n#### 42", "42"),  # GSM8K
        ("#### 1,234", "1234"),
        ("We get $\\boxed{579}$.", "579"),  # MATH
        ("\\boxed{ -3 }", "-3"),
        ("It is 12 apples, not 579 pears", "579"),  # otherwise: the last number
        ("The answer is 7.0", "7"),
        ("no number here", None),
        ("", None),
    ],
)
def test_final_number_reads_the_answer_as_models_write_it(completion: str, number: str | None) -> None:
    assert final_number(completion) == number


def test_an_explicit_answer_beats_numbers_around_it() -> None:
    assert final_number("3 + 4 = 7, so \\boxed{8} after the correction") == "8"
    assert final_number("10 items; the answer is 12; 99 was wrong") == "12"


@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("\\boxed{12}. Wait, 12 + 7 is not 20... \\boxed{19}", "19"),
        ("The answer is 12. Hmm, I carried wrong. The answer is 19.", "19"),
        ("Answer: 18\nCorrection, answer: 19", "19"),
        ("#### 18\nOops.\n#### 19", "19"),
        ("$\\boxed{18}$ is wrong; the final answer is $\\boxed{19}$.", "19"),
    ],
)
def test_a_model_that_corrects_itself_is_read_at_its_last_answer(completion: str, number: str) -> None:
    assert final_number(completion) == number


@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("19\nCheck: 19 - 7 = 12", "19"),  # the leading answer, not the check's result
        ("12 + 7 = 19. Let me verify: 19 - 7 = 12.", "19"),
        ("The answer is 19. Check: 19 - 12 = 7 ✓", "19"),
        ("\\boxed{19}\n\nVerification: 19 - 12 = 7", "19"),
        ("Let me check the sum: 12 + 7 = 19", "19"),  # a check before any number is the working
    ],
)
def test_a_check_equation_after_the_answer_is_not_the_answer(completion: str, number: str) -> None:
    assert final_number(completion) == number


@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("<think>\nMaybe the answer is 18? 12 + 7 = 18.\n</think>\n\nThe answer is 19.", "19"),
        ("<think>\\boxed{18}</think>\n19", "19"),
        ("<thinking>18</thinking> 19", "19"),
        ("12 + 7... so 18? No: 19.\n</think>\n\n19", "19"),  # the template opened the block in the prompt
        ("<think>\nThe answer is 19, probably. Let me", None),  # cut off mid-thought: no answer given
        ("<think>a</think> The answer is <think>b 18</think> 19", "19"),
    ],
)
def test_reasoning_is_never_read_as_the_answer(completion: str, number: str | None) -> None:
    assert final_number(completion) == number


@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("The answer is $1{,}234$.", "1234"),
        ("\\boxed{12\\,000}", "12000"),
        ("About 12\\!000 people", "12000"),
        ("$2{,}048$", "2048"),
        ("It costs \\$9{,}500.", "9500"),
        ("the answer is \\$9{,}500", "9500"),
        ("12\u202f000 (a narrow no-break space)", "12000"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\dfrac12", "0.5"),
        ("\\boxed{\\tfrac{1}{3}}", "1/3"),
        ("The answer is $\\frac{10}{4}$.", "2.5"),
        ("\\boxed{-\\frac{1}{2}}", "-0.5"),
        ("\\frac{-6}{8}", "-0.75"),
        ("The answer is $-5$.", "-5"),
        ("the answer is \u22125.", "-5"),  # the Unicode minus
        ("x = -12.50.", "-12.5"),  # a trailing period and zero
        ("The answer is **19**.", "19"),
        ("The answer is \\(19\\).", "19"),
        ("5 - 3 = 2", "2"),  # a binary minus is not a sign
        ("The answer is 1,234,567.", "1234567"),
    ],
)
def test_numbers_written_in_latex_read_as_the_numbers_they_are(completion: str, number: str) -> None:
    assert final_number(completion) == number


def test_equal_values_written_differently_compare_equal() -> None:
    forms = ["\\frac{3}{4}", "0.75", "6/8", "\\dfrac{6}{8}", "0.750"]
    assert {final_number(form) for form in forms} == {"0.75"}
    assert final_number("\\frac{2}{6}") == final_number("1/3") == "1/3"


def test_addition_scores_a_reasoning_models_corrected_answer() -> None:
    task = Addition.task(12, 7)
    completion = "<think>\n12 + 7 = 18? No, 19.\n</think>\n\nFirst I got $\\boxed{18}$; corrected: $\\boxed{19}$."
    assert task.score(completion).reward == 1.0
    assert task.score("<think>\nThe answer is 19").reward == 0.0  # never left its reasoning


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>x</think>y", "y"),
        ("x</think>y", "y"),
        ("y<think>x", "y"),
        ("a<think>x</think>b<thinking>z</thinking>c", "abc"),
        ("no reasoning", "no reasoning"),
    ],
)
def test_without_reasoning_keeps_only_what_is_outside_the_reasoning(text: str, answer: str) -> None:
    assert without_reasoning(text) == answer
