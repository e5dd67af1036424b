"""Write a generated block between its ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers.

Every table in README.md and docs/ that a script regenerates (zoo, paper claim, fast mode, benchmarks) goes
through here. A block lives in whichever of those files holds its markers, so moving a block to another page
moves its markers only: the script that writes it finds it there.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def block_file(name: str, root: Path = ROOT) -> Path:
    """The one file of README.md and docs/*.md that holds the markers of block ``name``."""
    start = f"<!-- {name}:start -->"
    found = [path for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
             if start in path.read_text(encoding="utf-8")]
    if len(found) != 1:
        where = ", ".join(str(p.relative_to(root)) for p in found) or "no file"
        raise SystemExit(f"block {name}: its start marker {start} is in {where}; it must be in exactly one of "
                         "README.md and docs/*.md")
    return found[0]


def write_readme_block(name: str, block: str, readme: Path | None = None) -> None:
    """Put ``block`` between the markers of ``name`` in ``readme`` (default: the file that holds them)."""
    readme = block_file(name) if readme is None else readme
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: markers {start} ... {end} not found; add them where the block goes")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{block}{end}", text))


def write_results(name: str, payload: dict, block: str, out: Path, readme: Path | None = None,
                  argv: list[str] | None = None) -> None:
    """What every table script ends with: ``out/<name>.json`` (``payload`` plus the command that wrote it, from
    ``argv``, or the process's own arguments), the block ``name`` (``block``; in ``readme``, default the file that
    holds its markers), and the block printed."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    # A path under the home folder is written as ~/..., so the record names no machine's user.
    command = " ".join([f"python reproduce/{name.replace('-', '_')}.py", *args]).replace(str(Path.home()), "~")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name.replace('-', '_')}.json"
    path.write_text(json.dumps({"command": command, **payload}, indent=2) + "\n")
    write_readme_block(name, block, readme)
    print(block)
