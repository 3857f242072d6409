"""trainer.envs.code: the program a code answer is scored as, when models reason, draft and correct
themselves before the final fenced block; run in the sandbox (skipped where there is none)."""

from __future__ import annotations

import pytest

from tests.support.paths import SHARED
from trainer.envs.code import CodeTask
from trainer.sandbox import Check

STUB = 'def clamp(x: int, lo: int, hi: int) -> int:\n    """Return x limited to the range [lo, hi]."""\n'
TESTS = (
    "def check(candidate):\n"
    "    assert candidate(5, 0, 3) == 3\n"
    "    assert candidate(-2, 0, 3) == 0\n"
    "    assert candidate(2, 0, 3) == 2\n"
)
TASK = CodeTask(name="clamp", code=STUB, check=Check("clamp", TESTS, call="check(clamp)"), reference=None, hints=())
DRAFT = "```python\ndef clamp(x, lo, hi):\n    return max(x, lo)\n```"
FINAL = "```python\ndef clamp(x, lo, hi):\n    return min(max(x, lo), hi)\n```"
CASE = SHARED / "data" / "cases" / "models-and-config" / "05-code-draft-inside-think" / "completion.md"


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (f"<think>\nA first try:\n{DRAFT}\nNo, that ignores hi.\n</think>\n\n{FINAL}", 1.0),  # the draft in reasoning
        (f"Here it is:\n{DRAFT}\nWait, that ignores hi. Fixed:\n{FINAL}", 1.0),  # corrected outside reasoning
        (f"{FINAL}\nUsage:\n```python\nprint(clamp(5, 0, 3))\n```", 1.0),  # a trailing snippet defines nothing
        (f"It is short.\n</think>\n\n{FINAL}", 1.0),  # the template opened the reasoning in the prompt
        (f"<think>\n{FINAL}\nThen I would check it", 0.0),  # cut off in reasoning: no answer, the stub alone
        (f"{FINAL}\nOn second thought:\n{DRAFT}", 0.0),  # the last definition is the answer, even a worse one
        ("<think>\nmin of max.\n</think>\n    return min(max(x, lo), hi)\n", 1.0),  # a continuation after reasoning
    ],
    ids=["draft-in-think", "self-corrected", "usage-snippet", "think-opened-in-prompt", "cut-off", "last-wins", "body"],
)
def test_the_final_defining_block_outside_reasoning_is_the_program(sandbox, completion, reward):
    assert TASK.score(completion, sandbox=sandbox).reward == reward


def test_the_program_holds_the_final_block_and_no_draft():
    program = TASK.program(f"<think>\n{DRAFT}\n</think>\n\n{FINAL}")
    assert program == STUB + "\n\n" + "def clamp(x, lo, hi):\n    return min(max(x, lo), hi)\n"


def test_shared_case_05_scores_the_final_block_not_the_draft_inside_think(sandbox):
    if not CASE.exists():
        pytest.skip(f"shared case 05 is not at {CASE}")
    completion = CASE.read_text()
    assert "return max(x, lo)" in completion.split("</think>")[0]  # the case still has its draft
    assert "return max(x, lo)" not in TASK.program(completion)
    assert TASK.score(completion, sandbox=sandbox).reward == 1.0
