"""The one gate in front of every test that needs a Docker engine (compose, the docker sandbox
backend, the multi-host test bed).

Where no engine answers, those tests skip, unless COMPOSER_REQUIRE_DOCKER=1 (what `.ci/run` sets):
then they fail, naming why, so that a CI run cannot go green with its Docker tests silently skipped.
Only the missing precondition is forgiven; an engine that answers and then errs is a failure, always.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE = "COMPOSER_REQUIRE_DOCKER"


def docker_required() -> bool:
    """COMPOSER_REQUIRE_DOCKER is set to anything but '' or '0'."""
    return os.environ.get(REQUIRE, "") not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for `reason`, or fail it when COMPOSER_REQUIRE_DOCKER says Docker must be here."""
    if docker_required():
        pytest.fail(f"{REQUIRE}=1 and {reason}", pytrace=False)
    pytest.skip(reason)


def docker_client():
    """A `docker.DockerClient` for the engine DOCKER_HOST (or the default socket) names, pinged.

    No answer: `unavailable`, naming the engine's error.
    """
    import docker

    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as error:
        reason = f"no Docker engine answers ({error}); `bash compose/provision.sh` starts one"
    unavailable(reason)  # outside the except: the report is the reason, not the SDK's exception chain
