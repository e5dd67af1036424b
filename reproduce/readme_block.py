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


def write_results(name: str, payload: dict, block: str, out: Path, readme: Path = README,
                  argv: list[str] | None = None) -> None:
    """What every table script ends with: ``out/<name>.json`` (``payload`` plus the command that wrote it, from
    ``argv``, or the process's own arguments), the README block ``name`` (``block``), and the block printed."""
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
