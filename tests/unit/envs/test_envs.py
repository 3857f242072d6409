"""trainer.envs: make_env's sources, the Task contract (prompt, hints weakest first, reference,
score with feedback), held-out splits, and code scoring through the sandbox."""

import random

import pytest

from trainer.envs import FiniteEnvironment, Score, UnknownSourceError, feedback_hint, make_env
from trainer.envs.base import FEEDBACK_LIMIT


def test_addition_reproduces_the_smoke_runs_tasks_and_rng_draws():
    # values printed by trainer/tasks.py before the port (git show 0cf3205:trainer/tasks.py)
    env, rng = make_env("addition", max_operand=19), random.Random(7)
    tasks = [env.sample(rng) for _ in range(3)]
    assert [t.prompt() for t in tasks] == ["What is 10+4?", "What is 12+1?", "What is 2+17?"]
    assert tasks[0].hints == ("The answer is even.", "The answer is between 11 and 17.", "The answer is 14.")
    assert rng.random() == 0.09413004193968255  # the same number of draws per sample
    assert tasks[0].prompt(tasks[0].hints[1]) == "What is 10+4? Hint: The answer is between 11 and 17."
    assert [tasks[0].reward(c) for c in (" 14 since", "15", "140", "")] == [1.0, 0.0, 0.0, 0.0]
    assert tasks[0].score("15") == Score(0.0, False, "15 is wrong.")
    assert tasks[0].reference == "14"


def test_unknown_sources_and_options_name_the_known_ones():
    with pytest.raises(UnknownSourceError, match="known: addition, humaneval, feature_deletion, code_arith") as err:
        make_env("additon")
    assert err.value.key == "task.source" and "reasoning_gym:<dataset>" in err.value.known
    with pytest.raises(UnknownSourceError, match="unknown reasoning_gym dataset 'gsm_symbolc'.*gsm_symbolic"):
        make_env("reasoning_gym:gsm_symbolc")
    with pytest.raises(ValueError, match="task.options.max_operands: addition takes no option"):
        make_env("addition", max_operands=9)


@pytest.mark.parametrize("source", ["humaneval", "code_arith", "reasoning_gym:chain_sum"])
def test_training_never_samples_a_held_out_task(source):
    env = make_env(source)
    assert isinstance(env, FiniteEnvironment)
    held = {id(t) for t in env.held_out}
    assert held and len(env.train) + len(env.held_out) == len(env.tasks)
    rng = random.Random(0)
    drawn = {id(env.sample(rng)) for _ in range(3000)}
    assert not drawn & held
    assert len(drawn) > 0.9 * len(env.train)


def test_humaneval_task_accepts_continuation_and_fenced_whole_function():
    env = make_env("humaneval")
    task = next(t for t in env.tasks if t.name == "HumanEval/10")  # make_palindrome uses the prompt's is_palindrome
    body = task.reference[len(task.code) :]
    assert task.score(body).passed
    fenced = "Here it is:\n```python\ndef make_palindrome(string: str) -> str:\n" + body + "```\nDone."
    assert task.score(fenced).passed  # the prompt's helper is kept in front of the block
    wrong = task.score("    return string\n")
    assert (wrong.reward, wrong.passed) == (0.0, False)
    assert wrong.feedback.startswith("failed:") and "last call: make_palindrome(" in wrong.feedback


def test_code_hints_go_from_partial_to_the_reference():
    task = make_env("humaneval").tasks[0]
    assert task.hints[0].startswith("A test it must pass: assert has_close_elements(")
    assert task.hints[-1].endswith(task.reference) and task.reference.startswith(task.code)
    assert task.prompt(task.hints[0]).startswith("Complete the following Python function.\n\nHint: A test")


def test_code_arith_scores_a_batch_in_the_sandbox():
    env = make_env("code_arith")
    tasks = env.tasks[:6]
    completions = [t.reference[len(t.code) :] if i % 2 == 0 else "    return 0\n" for i, t in enumerate(tasks)]
    scores = env.score_many(tasks, completions, workers=2)
    assert [s.passed for s in scores] == [True, False] * 3
    assert all(s.reward == float(s.passed) for s in scores)
    assert "returned 0" in scores[1].feedback


def test_feedback_is_truncated_keeping_its_end():
    env = make_env("code_arith")
    task = env.tasks[0]
    noisy = "    raise ValueError('" + "x" * 5000 + "END')\n"
    score = task.score(noisy)
    assert not score.passed and len(score.feedback) <= FEEDBACK_LIMIT
    assert "last call:" in score.feedback


def test_reasoning_gym_is_scored_by_the_datasets_own_checker():
    env = make_env("reasoning_gym:gsm_symbolic", size=20, seed=3)
    task = env.tasks[0]
    assert task.score(task.reference).passed
    assert task.score(f"Let me think.\n<answer>{task.reference}</answer>").reward == 1.0
    wrong = task.score("<answer>-1</answer>")
    assert not wrong.passed and wrong.reward < 1.0 and "'-1'" in wrong.feedback
    assert task.hints[-1] == f"The answer is {task.reference}."


def test_feedback_hint_carries_the_attempt_and_the_verdict():
    hint = feedback_hint(" 13\n", Score(0.0, False, "13 is wrong."))
    assert hint == "A previous attempt did not pass. The attempt:\n13\nFeedback:\n13 is wrong."


@pytest.fixture(scope="module")
def feature_deletion():
    return make_env("feature_deletion")


def test_feature_deletion_makes_at_least_50_validated_tasks(feature_deletion):
    env = feature_deletion
    assert len(env.tasks) >= 50
    assert sum(env.excluded.values()) > 0  # some candidates fail validation and are counted, not kept
    assert {t.name for t in env.train}.isdisjoint(t.name for t in env.held_out)
    task = next(t for t in env.tasks if t.name == "boltons.strutils.camel2under")
    stub = task.code.split("write it.")[1]
    assert "def camel2under(camel_string):" in stub and "_camel2under_re.sub" not in stub
    body = task.reference.split('"""')[-1]
    assert task.score(body).passed  # the original body, as a continuation
    fenced = f"```python\n{task.reference}```"
    assert task.score(fenced).passed  # the whole function in a fenced block
    wrong = task.score("    return camel_string.lower()\n")
    assert not wrong.passed and "Expected:\n    'basic_parse_test'" in wrong.feedback


def test_feature_deletion_cannot_import_the_original_module(feature_deletion):
    task = next(t for t in feature_deletion.tasks if t.name == "boltons.strutils.camel2under")
    cheat = "    from boltons.strutils import camel2under as original\n    return original(camel_string)\n"
    score = task.score(cheat)
    assert not score.passed and "ModuleNotFoundError: No module named 'boltons'" in score.feedback
