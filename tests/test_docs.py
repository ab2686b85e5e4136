"""The documentation is self-contained: links resolve, nothing points outside the repository.

Fast: reads text files only (no JAX).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Names of documents outside the repository (built in pieces so that this file
# does not name them itself).
_OUTSIDE = (".." + "/shared", "THEORY" + ".md", "DESIGN" + ".md")

# Directories that are never part of the project's sources (when git is absent).
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "build",
              "dist", "workdirs", ".whl"}

_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _project_files() -> list[str]:
    """Repository-relative paths of the tracked and not-ignored files that exist."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for directory, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files]
    return sorted(p.replace(os.sep, "/") for p in paths if os.path.isfile(os.path.join(ROOT, p)))


def _text(path: str) -> str | None:
    """The file's text, or None for a binary file."""
    with open(os.path.join(ROOT, path), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _links(text: str, markdown: bool) -> list[str]:
    """Link targets `[text](target)`, outside fenced code blocks of Markdown files."""
    if markdown:
        text = _FENCE.sub("", text)
    return _LINK.findall(text)


def _resolve(path: str, target: str) -> str | None:
    """The absolute path a relative link target names, or None for external links."""
    if _EXTERNAL.match(target) or target.startswith("#"):
        return None
    target = target.split("#", 1)[0].split("?", 1)[0]
    if target.startswith("/"):
        return os.path.normpath(target)
    return os.path.normpath(os.path.join(ROOT, os.path.dirname(path), target))


def _inside(absolute: str) -> bool:
    return os.path.commonpath([ROOT, absolute]) == ROOT


FILES = _project_files()
TEXTS = {p: t for p in FILES if (t := _text(p)) is not None}
DOCS = sorted(p for p in TEXTS if p == "README.md" or re.fullmatch(r"docs/[^/]+\.md", p))


def test_the_file_list_covers_the_project():
    for path in ("README.md", "docs/theory.md", "docs/design.md", "docs/arguments.md",
                 "elastic_jax/bounds.py", "tests/test_docs.py",
                 "experiments/results/consistency_table/report.md"):
        assert path in TEXTS, path


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_resolve_inside_the_repository(path):
    bad = []
    for target in _links(TEXTS[path], markdown=True):
        absolute = _resolve(path, target)
        if absolute is None:
            continue
        if not _inside(absolute) or not os.path.exists(absolute):
            bad.append(target)
    assert not bad, f"{path}: links that do not resolve to a file of the repository: {bad}"


def test_no_file_names_a_path_outside_the_repository():
    bad = []
    for path, text in TEXTS.items():
        for name in _OUTSIDE:
            for match in re.finditer(re.escape(name), text):
                line = text.count("\n", 0, match.start()) + 1
                bad.append(f"{path}:{line}: {name}")
        for target in _links(text, markdown=path.endswith(".md")):
            absolute = _resolve(path, target)
            if absolute is not None and not _inside(absolute):
                bad.append(f"{path}: link {target} leaves the repository")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def _headings(path: str) -> list[str]:
    return re.findall(r"^#{2,3} (.+?)\s*$", _FENCE.sub("", TEXTS[path]), re.MULTILINE)


def test_every_cited_theory_section_exists():
    numbers = {m.group(1) for h in _headings("docs/theory.md")
               if (m := re.match(r"(\d+)\. ", h))}
    assert {"1", "2", "3", "4", "5", "6", "7"} <= numbers
    bad = []
    for path, text in TEXTS.items():
        for match in re.finditer(r"docs/theory\.md('s)? sections? ((?:\d+(?:, | and |, and )?)+)",
                                 text):
            for number in re.findall(r"\d+", match.group(2)):
                if number not in numbers:
                    bad.append(f"{path}: {match.group(0)}")
    assert not bad, "citations of missing sections:\n" + "\n".join(bad)


def test_every_cited_design_section_exists():
    headings = set(_headings("docs/design.md"))
    assert {"The one abstraction", "Randomness", "Workers and devices", "Performance",
            "Invariants"} <= headings
    bad = [f"{path}: {m.group(0)}" for path, text in TEXTS.items()
           for m in re.finditer(r'docs/design\.md, "([^"]+)"', text)
           if m.group(1) not in headings]
    assert not bad, "citations of missing sections:\n" + "\n".join(bad)
