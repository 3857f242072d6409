"""Where tests find the repository, its fixtures and the shared data beside the clone."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"  # ../shared beside the clone (CI puts it there); tests skip when absent
