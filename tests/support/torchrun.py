"""The worker under `torchrun --standalone` in tests, and why a launch failed, said last.

Why one place: the launches had drifted into six hand-written copies, each setting
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. With that set, the agent picks rank 0's master port with
`get_free_port()` (bind to port 0, close) and rank 0's worker binds it seconds later, after its
imports (torch.distributed.elastic.rendezvous.api.RendezvousStoreInfo.build): anything on the
machine that takes the port in between kills rank 0 with EADDRINUSE. A launch that never restarts
shares the agent's own rendezvous store instead, which is already listening. A launch that
restarts needs the fresh store (restarted workers could read the dead attempt's addresses,
pytorch/pytorch#135712) and keeps the small race.

`failure` puts the workers' exception lines after the output's tail, so the last lines of a CI
log name the cause instead of torchrun's ChildFailedError banner.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# "ValueError: ...", "torch.distributed.DistNetworkError: ...", "[rank1]: RuntimeError: ..."
_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)\b:?")


def worker_command(*overrides: str, config: str = "test.yaml") -> list[str]:
    """`-m trainer.worker --config configs/<config> --set K=V ...`: the worker's argv after the
    interpreter or torchrun."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return ["-m", "trainer.worker", "--config", str(REPO / "configs" / config), *sets]


def torchrun_command(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    """`torchrun --standalone --nproc-per-node=<nproc> --max-restarts=<n> <args>`."""
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", *args]


def torchrun_env(run_dir: Path | None = None, *, max_restarts: int = 0, **extra: str) -> dict[str, str]:
    """This process's environment plus COMPOSER_RUN_DIR and `extra`; the rendezvous store is
    shared unless the launch restarts (see the module docstring)."""
    env = {**os.environ, **extra}
    if run_dir is not None:
        env["COMPOSER_RUN_DIR"] = str(run_dir)
    if max_restarts > 0:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    else:
        env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return env


def launch(
    run_dir: Path, *overrides: str, nproc: int = 2, max_restarts: int = 0, config: str = "test.yaml", **extra: str
) -> subprocess.Popen:
    """The worker on `nproc` processes writing to `run_dir`, stdout and stderr as one text pipe."""
    return subprocess.Popen(
        torchrun_command(nproc, *worker_command(*overrides, config=config), max_restarts=max_restarts),
        cwd=REPO,
        env=torchrun_env(run_dir, max_restarts=max_restarts, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a `launch`; its output. Fails the test with `failure(output)` unless it exited 0."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, failure(output)
    return output


def failure(output: str, tail: int = 4000) -> str:
    """The last `tail` characters of a failed launch's output, then its distinct exception lines
    (torchrun's ChildFailedError left out), so the cause is the last thing a log shows."""
    causes: list[str] = []
    for line in output.splitlines():
        if _EXCEPTION_LINE.match(line) and "ChildFailedError" not in line and line not in causes:
            causes.append(line)
    said = "\n".join(causes[-8:]) if causes else "(no exception line in the output)"
    return f"{output[-tail:]}\n--- the workers' exceptions, last ones last:\n{said}"
