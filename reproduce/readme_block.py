"""Write a generated block into README.md between its ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers.

Every table in the README that a script regenerates (zoo, paper claim, fast mode, benchmarks) goes through here.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_readme_block(name: str, block: str, readme: Path = README) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: markers {start} ... {end} not found; add them where the block goes")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{block}{end}", text))
