import random

from trainer.envs import sibling_hint
from trainer.envs.addition import Addition as AdditionTasks
from trainer.envs.addition import AdditionTask as Task


def test_addition_answer_hints_and_reward():
    tasks = AdditionTasks(max_operand=19)
    rng = random.Random(3)
    for _ in range(200):
        task = tasks.sample(rng)
        a, b = map(int, task.question.removeprefix("What is ").removesuffix("?").split("+"))
        assert 0 <= a <= 19 and 0 <= b <= 19
        assert task.answer == str(a + b)
        assert task.reward(task.answer) == 1.0
        assert task.reward(f" {task.answer} because") == 1.0
        assert task.reward(str(a + b + 1)) == 0.0
        assert task.reward(task.answer + "0") == 0.0  # 190 is not 19
        assert task.reward("") == 0.0
        # hints get stronger: the last one gives the answer away, the first does not
        assert task.answer in task.hints[-1] and task.answer not in task.hints[0]
        assert task.hints[0] == f"The answer is {['even', 'odd'][(a + b) % 2]}."
        low, high = map(int, task.hints[1].removeprefix("The answer is between ").rstrip(".").split(" and "))
        assert low <= a + b <= high


def test_prompt_with_hint_and_sibling_hint():
    task = Task("What is 1+2?", "3", ("h0", "h1", "h2"))
    assert task.prompt() == "What is 1+2?"
    assert task.prompt("h2") == "What is 1+2? Hint: h2"
    assert sibling_hint(" 3") == "A correct answer is 3."


def test_corpus_covers_every_prompt_shape():
    corpus = AdditionTasks(9).corpus()
    assert any("Hint: The answer is" in line for line in corpus)
    assert any(line.startswith("A correct answer is") for line in corpus)


def test_held_out_problems_are_never_drawn_for_training_and_the_split_is_fixed():
    tasks = AdditionTasks(max_operand=9, held_out=20)
    held = {t.question for t in tasks.held_out}
    assert len(held) == 20
    rng = random.Random(0)
    drawn = {tasks.sample(rng).question for _ in range(5000)}
    assert drawn.isdisjoint(held) and len(drawn) == 100 - 20  # every other problem still appears
    assert [t.question for t in AdditionTasks(9, held_out=20).held_out] == sorted(held, key=_operands)


def test_holding_out_more_than_half_the_problems_is_refused():
    try:
        AdditionTasks(max_operand=3, held_out=9)
    except ValueError as error:
        assert "at most half of the 16 problems" in str(error)
    else:
        raise AssertionError("held_out=9 of 16 must be refused")


def _operands(question: str) -> tuple[int, int]:
    a, b = question.removeprefix("What is ").removesuffix("?").split("+")
    return int(a), int(b)
