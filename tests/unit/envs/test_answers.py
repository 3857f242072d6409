"""`trainer.answers.final_number`: the forms real models write their answer in, one row each."""

import pytest

from trainer.envs.answers import final_number


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
