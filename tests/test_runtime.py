"""ndeconv.keep_freed_memory: a large buffer freed and allocated again is served from the same pages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Allocate, fill and free a 200 MB tensor eight times; report the minor page faults of each round. The probe imports
# the layers first, as a training script does: on a heap holding torch alone, torch's 64-byte-aligned request for
# the block does not fit the freed block once a small allocation lands above it, and glibc grows the heap instead
# (seen with strace: brk by 200 MB a round), so the pages fault in again.
_PROBE = r"""
import json, resource, sys, torch
import ndeconv.layers
from ndeconv.runtime import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(50_000_000).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    # A fresh process: the setting is process-wide and must not leak into the test session.
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow  # two subprocesses, each allocating 200 MB again and again: about 16 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    pages = 50_000_000 * 4 // 4096
    default, kept = _probe("default"), _probe("keep")
    assert kept["took"] is True
    # glibc's default maps every round afresh: each one faults in all its pages again.
    assert all(f > pages // 2 for f in default["faults"]), default
    # Kept: once the heap has grown to hold the buffer (a few rounds, depending on what the import left in
    # it), the rounds touch pages already mapped.
    assert sum(kept["faults"][4:]) < pages // 100, kept


def test_train_keeps_freed_memory_by_default() -> None:
    from ndeconv.cli import build_parser
    from ndeconv.training import TrainConfig

    assert TrainConfig().keep_freed_memory is True
    args = build_parser().parse_args(["train", "--keep-freed-memory", "false"])
    assert args.keep_freed_memory is False
