"""Docs that cannot rot: every code block of README.md and docs/*.md runs, and every relative link resolves.

A fenced ``python`` or ``bash`` block runs (from the repository root, the blocks of one page each in a fresh
namespace of one process) unless the line right before its fence is a visible opt-out with a reason:
``<!-- docs-test: skip (why) -->``. Every relative link and image names a file of the repository, and every
``#anchor`` a heading of the page it points to (GitHub's anchor rule).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(page: Path) -> list[tuple[str, str, str | None, int]]:
    """(language, code, skip reason or None, line) of each fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append((match.group(1), match.group(2), skip.group(1) if skip else None,
                      text.count("\n", 0, match.start()) + 1))
    return found


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _page_id(page: Path) -> str:
    return str(page.relative_to(PROJECT_ROOT))


def test_every_block_is_python_or_bash_and_every_opt_out_gives_a_reason() -> None:
    for page in PAGES:
        for language, _, skip, line in _blocks(page):
            assert language in ("python", "bash"), f"{_page_id(page)}:{line}: a ```{language} block; use python or bash"
            assert skip is None or skip.strip(), f"{_page_id(page)}:{line}: an opt-out without a reason"
        text = page.read_text(encoding="utf-8")
        for marker in re.finditer(r"<!-- docs-test:[^>]*-->", text):
            assert SKIP.search(marker.group(0)), f"{_page_id(page)}: malformed marker {marker.group(0)}"


# Runs each block with exec() in a fresh namespace; prints which block failed, then re-raises.
_RUNNER = """
import json, sys, traceback
for line, code in json.loads(sys.stdin.read()):
    try:
        exec(compile(code, f"{PAGE}:{line}", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"block at {PAGE}:{line} failed", file=sys.stderr)
        raise
"""


# Each page's blocks load shipped weights and build networks: 5-15 s a page, about 45 s in all on 2 busy cores.
@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b[0] == "python" and b[2] is None for b in _blocks(p))],
                         ids=_page_id)
def test_python_blocks_run(page: Path) -> None:
    blocks = [(line, code) for language, code, skip, line in _blocks(page) if language == "python" and skip is None]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", _RUNNER.replace("{PAGE}", _page_id(page))],
                            input=json.dumps(blocks), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b[0] == "bash" and b[2] is None for b in _blocks(p))],
                         ids=_page_id)
def test_bash_blocks_run(page: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for language, code, skip, line in _blocks(page):
        if language == "bash" and skip is None:
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=PROJECT_ROOT, env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{_page_id(page)}:{line}: {result.stderr[-3000:]}"


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists() or not resolved.is_relative_to(PROJECT_ROOT):
                broken.append(f"{_page_id(page)}: {target} (no such file in the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{_page_id(page)}: {target} (no heading #{anchor} there)")
    assert not broken, "\n".join(broken)


def test_docs_do_not_point_outside_the_repository() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{_page_id(page)} names a path that is not in a clone"
