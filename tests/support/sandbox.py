"""The process sandbox as a module-scoped fixture: skips with the sandbox's own reason where none can be made."""

import pytest

from trainer.sandbox import SandboxUnavailable, make_sandbox


@pytest.fixture(scope="module")
def sandbox():
    """A `trainer.sandbox.make_sandbox()` box, closed after the module; skips when unavailable."""
    try:
        box = make_sandbox()
    except SandboxUnavailable as error:
        pytest.skip(str(error))
    yield box
    box.close()
