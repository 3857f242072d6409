"""The documentation's links lead somewhere: README.md and every .md under docs/ (recursively).

A relative link must name a file or folder that exists in the repository (code paths included);
a link with a #fragment into a Markdown file must name one of its headings, slugged the way
GitHub slugs them. Links inside code blocks and code spans are text, not links. Standard library
and pytest only, and fast: no network, no imports from the project.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# The capability manuals the README indexes; their names are contracts (issue 22, "The house").
CAPABILITY_DOCS = (
    "architecture.md",
    "training.md",
    "losses.md",
    "diloco.md",
    "environments.md",
    "agent.md",
    "traces.md",
    "deployment.md",
    "results.md",
)
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); text may hold one level of brackets (a badge, `[x]`).
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+[\"'(][^)]*)?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documentation_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md"] if (root / "README.md").exists() else []
    return files + sorted((root / "docs").rglob("*.md"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose (not in code blocks or code spans)."""
    found = []
    for number, line in prose_lines(text):
        line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1) for m in REFERENCE_DEFINITION.finditer(line)]
        targets += [m.group(1) for m in HTML_LINK.finditer(line)]
        found += [(number, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for t in targets]
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower-cased, punctuation dropped
    (letters, digits, `-` and `_` stay, Unicode letters included), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = re.sub(r"(\*{1,3})(\S(?:.*?\S)?)\1", r"\2", text)  # *emphasis*
    text = re.sub(r"(?<!\w)(_{1,3})(\S(?:.*?\S)?)\1(?!\w)", r"\2", text)  # _emphasis_, not snake_case
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #fragment that lands somewhere in a Markdown file: its headings' slugs (a repeated
    heading gets -1, -2, ... as on GitHub) and explicit <a id=...> / <a name=...> anchors."""
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(text):
        found.update(m.group(1) for m in HTML_ANCHOR.finditer(line))
        match = ATX_HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def dead_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """One line per relative link that leads nowhere: 'FILE:LINE: TARGET: why'."""
    dead = []
    for source in files:
        for number, target in links(source.read_text(encoding="utf-8")):
            if SCHEME.match(target) or target.startswith("//"):
                continue  # https:, mailto:, ...: not this test's business
            where = f"{source.relative_to(root)}:{number}: {target}"
            path_part, _, fragment = target.partition("#")
            path_part = unquote(path_part.split("?", 1)[0])
            if path_part.startswith("/"):
                resolved = (root / path_part.lstrip("/")).resolve()
            else:
                resolved = (source.parent / path_part).resolve() if path_part else source.resolve()
            if resolved != root.resolve() and root.resolve() not in resolved.parents:
                dead.append(f"{where}: leaves the repository")
            elif not resolved.exists():
                dead.append(f"{where}: no such file or folder")
            elif fragment and resolved.suffix.lower() == ".md" and resolved.is_file():
                if unquote(fragment).lower() not in anchors(resolved):
                    dead.append(f"{where}: no heading #{fragment} in {resolved.relative_to(root.resolve())}")
    return dead


# ---- the documentation as it is -------------------------------------------------------------


def test_every_relative_link_in_readme_and_docs_resolves():
    files = documentation_files()
    assert len(files) > 1, "README.md and docs/ hold no Markdown at all"
    dead = dead_links(files)
    assert not dead, f"{len(dead)} dead link(s) in the documentation:\n" + "\n".join(dead)


def test_docs_has_every_capability_manual_the_readme_promises():
    missing = [name for name in CAPABILITY_DOCS if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {missing}"


def test_readme_links_every_capability_manual_and_the_notebook():
    targets = {target.partition("#")[0] for _, target in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    expected = {f"docs/{name}" for name in CAPABILITY_DOCS} | {"docs/notebook/"}
    unlinked = sorted(expected - targets)
    assert not unlinked, f"README.md's index does not link {unlinked}"


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; depth goes in docs/ (at most {README_MAX_LINES})"


def test_notebook_entries_are_dated_year_month_then_name():
    entries = sorted((DOCS / "notebook").glob("*.md"))
    assert entries, "docs/notebook/ holds no entries"
    undated = [
        p.name for p in entries if not re.fullmatch(r"20\d\d-(0[1-9]|1[0-2])-[a-z0-9]+(-[a-z0-9]+)*\.md", p.name)
    ]
    assert not undated, f"notebook entries must be named like 2026-11-agent-smoke-seeds.md: {undated}"


# ---- the checker itself: it must catch what it claims to catch ------------------------------


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("The layer rule", "the-layer-rule"),
        ("Containers (`docker compose`, `python -m orchestrator`)", "containers-docker-compose-python--m-orchestrator"),
        (
            "Does each channel help? The α/β ablation (`make ablation`, issue 15)",
            "does-each-channel-help-the-αβ-ablation-make-ablation-issue-15",
        ),
        ("The probe's course (2026-12-01)", "the-probes-course-2026-12-01"),
        ("Agent traces → preference pairs (`trainer.traces`)", "agent-traces--preference-pairs-trainertraces"),
        ("**Bold** and [a link](x.md) and snake_case and a_b_c", "bold-and-a-link-and-snake_case-and-a_b_c"),
        ("_Emphasis_ stays words", "emphasis-stays-words"),
    ],
)
def test_heading_slugs_match_githubs(heading, slug):
    assert github_slug(heading) == slug


def test_link_checker_reports_a_missing_file_a_missing_heading_and_nothing_else(tmp_path):
    (tmp_path / "docs" / "notebook").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Same\n\n## Same\n\nText.\n")
    (tmp_path / "README.md").write_text(
        "# Readme\n\n"
        "[ok](docs/a.md) [ok heading](docs/a.md#title) [ok repeat](docs/a.md#same-1) [ok code](code.py)\n"
        "[ok folder](docs/notebook/) [ok self](#readme) [web](https://example.com/missing)\n"
        "[gone](docs/missing.md)\n"
        "[bad heading](docs/a.md#no-such-heading)\n"
        "[gone code](trainer/nowhere.py#L3)\n"
        "`[in a code span](docs/missing.md)`\n"
        "```\n[in a code block](docs/missing.md)\n```\n"
        "[ref]: docs/also-missing.md\n"
    )
    dead = dead_links(documentation_files(tmp_path), root=tmp_path)
    assert [line.split(": ")[1] for line in dead] == [
        "docs/missing.md",
        "docs/a.md#no-such-heading",
        "trainer/nowhere.py#L3",
        "docs/also-missing.md",
    ], dead
