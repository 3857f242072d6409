"""Fixtures shared across the test packages (defined in tests/support/, registered here)."""

from tests.support.models import model_and_tokenizer, policy  # noqa: F401
from tests.support.sandbox import sandbox  # noqa: F401
