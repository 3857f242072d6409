"""Reading JSON as a reader in another language would: NaN and Infinity are not JSON (RFC 8259)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (Python's own reader accepts them)."""
    return json.loads(text, parse_constant=_refuse)


def read_strict(path: Path) -> Any:
    return loads_strict(path.read_text())


def read_strict_lines(path: Path) -> list[Any]:
    return [loads_strict(line) for line in path.read_text().splitlines() if line.strip()]
