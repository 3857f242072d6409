"""The layer rule of docs/architecture.md, asserted from the imports themselves.

Every import of trainer/ and orchestrator/ is read with `ast` (module level, inside functions and
under TYPE_CHECKING alike: a dependency is a dependency), resolved to a project module, and held
against the table below; and the module graph must have no cycle. The last tests are tests of the
test: a copy of the tree with a forbidden import, or a cycle, added by hand must fail.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests.support.paths import REPO

PACKAGES = ("trainer", "orchestrator")

# layer -> the layers it may import (its own is always allowed). Foundation modules import nothing
# of the project outside the foundation (metrics -> checkpoint.strict_json); `run` may import every
# layer below it; the worker is the schedule on top.
BELOW_RUN = {"sandbox", "envs", "traces", "diloco", "objective", "rollout", "config", "foundation", "teachers"}
ALLOWED: dict[str, set[str]] = {
    "sandbox": set(),
    "envs": {"sandbox"},
    "traces": set(),
    "diloco": set(),
    "objective": {"traces"},
    "rollout": {"envs", "objective"},
    "config": {"envs", "sandbox"},
    # External teachers talk HTTP: above rollout (they fill its PolicyBatch fields and render with its
    # templates, traces' render_pair) and below run, the only layer that calls them.
    "teachers": {"envs", "sandbox", "traces", "objective", "rollout", "config", "foundation"},
    "foundation": set(),
    "run": BELOW_RUN,
    "worker": {"run", "config"},
    # Command-line tools on top, beside the worker: the export and the memory plan.
    "tools": {"run", *BELOW_RUN},
    # A command line inside a package may also use the one atomic file write.
    "traces-cli": {"traces", "foundation"},
    # cost-floor builds the config's policy as a run does (run.build's environment, the collector's warm-up).
    "teachers-cli": {"teachers", "run", "config", "rollout", "envs", "foundation"},
}
# The orchestrator runs outside the workers: of the trainer it may read the config and the run
# directory's rules only (module by module, not whole layers).
ORCHESTRATOR_MAY_IMPORT = {"trainer", "trainer.config", "trainer.run", "trainer.run.placement"}
FOUNDATION = {"trainer.checkpoint", "trainer.metrics", "trainer.model", "trainer.precision"}


def layer_of(module: str) -> str | None:
    """The layer a project module belongs to (None: the bare `trainer` package)."""
    if module.startswith("orchestrator"):
        return "orchestrator"
    if module == "trainer.traces.__main__":
        return "traces-cli"
    if module == "trainer.teachers.__main__":
        return "teachers-cli"
    if module in FOUNDATION:
        return "foundation"
    if module == "trainer.losses":  # the documented face of trainer.objective.losses
        return "objective"
    if module == "trainer.agent":  # the episode API's old import path, a face of rollout and envs
        return "rollout"
    parts = module.split(".")
    if len(parts) < 2:
        return None
    # trainer.elastic (the round boundary of elastic DiLoCo) is DiLoCo's layer: torch and stdlib only
    named = {
        "worker": "worker",
        "config": "config",
        "diloco": "diloco",
        "elastic": "diloco",
        "export": "tools",
        "plan": "tools",
    }
    return named.get(parts[1], parts[1])


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages under `root`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported project module) for every import in the file, relative ones resolved and
    `from package import submodule` counted as the submodule."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # trainer.sandbox.base.Check -> trainer.sandbox.base
                name = name.rpartition(".")[0]
            if name and name != module:
                found.append((node.lineno, name))
    return found


def graph(root: Path) -> dict[str, list[tuple[int, str]]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def violations(root: Path) -> list[str]:
    """Every import that breaks the layer rule, as `file:line: a -> b (layer x may not import y)`."""
    said = []
    modules = project_modules(root)
    for module, edges in graph(root).items():
        source = layer_of(module)
        where = modules[module].relative_to(root)
        for line, target in edges:
            if source == "orchestrator":
                if target.startswith("trainer") and target not in ORCHESTRATOR_MAY_IMPORT:
                    said.append(
                        f"{where}:{line}: {module} -> {target} (orchestrator may import only {ORCHESTRATOR_MAY_IMPORT})"
                    )
                continue
            target_layer = layer_of(target)
            if target_layer is None or source is None or target_layer == source:
                continue
            if target_layer not in ALLOWED[source]:
                said.append(f"{where}:{line}: {module} -> {target} (layer {source} may not import {target_layer})")
    return said


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    edges = {module: sorted({target for _, target in targets}) for module, targets in graph(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_import_in_trainer_and_orchestrator_points_down_the_layers():
    assert violations(REPO) == []


def test_there_is_no_import_cycle_in_trainer_or_orchestrator():
    assert cycles(REPO) == []


def test_only_the_collector_choice_reads_agent_enabled_and_nothing_probes_an_environment():
    """Issue 22: single-turn vs episodes is chosen once (run/collectors.py; config.py validates the
    key); environments declare their capabilities in envs/base.py instead of being probed."""
    readers = sorted(
        str(path.relative_to(REPO)) for path in (REPO / "trainer").rglob("*.py") if "agent.enabled" in path.read_text()
    )
    assert readers == ["trainer/config.py", "trainer/run/collectors.py"]
    probes = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for path in (REPO / "trainer").rglob("*.py")
        for line in path.read_text().splitlines()
        if ("getattr(" in line or "hasattr(" in line) and "env" in line.split("getattr(")[-1].split(",")[0]
    ]
    assert probes == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages to break by hand."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize(
    ("file", "line", "named"),
    [
        ("trainer/sandbox/base.py", "from trainer.envs import make_env", "layer sandbox may not import envs"),
        ("trainer/envs/code.py", "import trainer.rollout.sampling", "layer envs may not import rollout"),
        (
            "trainer/objective/losses.py",
            "from trainer.config import ConfigError",
            "layer objective may not import config",
        ),
        ("trainer/rollout/episodes.py", "from trainer import sandbox", "layer rollout may not import sandbox"),
        ("trainer/diloco.py", "from .run import build", "layer diloco may not import run"),
        ("trainer/run/sharding.py", "from trainer.plan import plan", "layer run may not import tools"),
        ("trainer/checkpoint.py", "from trainer.run.sharding import shard", "layer foundation may not import run"),
        (
            "trainer/worker.py",
            "from trainer.rollout.episodes import run_episodes",
            "layer worker may not import rollout",
        ),
        ("orchestrator/launcher.py", "from trainer.run.build import build", "orchestrator may import only"),
    ],
)
def test_the_layer_test_fails_when_a_forbidden_import_is_added(tree, file, line, named):
    assert violations(tree) == []
    append(tree / file, line)
    said = violations(tree)
    assert len(said) == 1 and file in said[0] and named in said[0], said


def test_the_cycle_test_fails_when_a_cycle_is_added(tree):
    assert cycles(tree) == []
    append(tree / "trainer/rollout/sampling.py", "from trainer.rollout.single_turn import rollout")
    assert cycles(tree) == [["trainer.rollout.sampling", "trainer.rollout.single_turn"]]
