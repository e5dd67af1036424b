"""``ndeconv train`` under torchrun: 2 CPU processes (gloo) end with identical parameters and deconvolution
buffers, and rank 0 alone writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ndeconv.datasets import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)"
)

# Each rank trains through the same entry point as `ndeconv train` and dumps its own final state. Each rank is
# given its own --out: a rank other than 0 that wrote anything would leave its folder behind.
DRIVER = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    from ndeconv.cli import build_parser
    from ndeconv.training import TrainConfig, train

    rank = int(os.environ["RANK"])
    base, argv = sys.argv[1], sys.argv[2:]
    args = build_parser().parse_args(["train", *argv])
    given = {k: getattr(args, k) for k in args._train_fields if getattr(args, k) is not None}
    result = train(TrainConfig.from_dict(given), out=os.path.join(base, f"out-rank{rank}"), given=frozenset(given))
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(base, f"state-rank{rank}.safetensors"))
""")


@pytest.mark.slow  # two gloo ranks training PNASNet-A: about 20 s
def test_two_cpu_ranks_agree_and_only_rank0_writes(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(tmp_path), "--arch", "pnasnet_a", "--train-subset", "16", "--test-subset", "8", "--batch-size", "4",
           "--epochs", "1", "--deconv-iter", "2", "--sync-deconv", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    states = [load_file(str(tmp_path / f"state-rank{r}.safetensors")) for r in range(2)]
    assert states[0].keys() == states[1].keys()
    assert any(k.endswith("running_deconv") for k in states[0])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key

    run = tmp_path / "out-rank0"
    assert not (tmp_path / "out-rank1").exists(), "rank 1 wrote a run directory"
    saved = load_file(str(run / "model.safetensors"))
    for key in saved:
        assert torch.equal(saved[key], states[0][key]), key
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["world_size"] == 2 and config["train"]["sync_deconv"] is True
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 16 images over 2 ranks at batch 4: 2 steps per epoch per rank; every test image counted once.
    assert len(rows) == 1 and rows[0]["step"] == 2
    assert rows[0]["test_top1"] * 8 / 100 == pytest.approx(round(rows[0]["test_top1"] * 8 / 100))


ON_MAIN_FAILS = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from ndeconv.errors import NdeconvError
    from ndeconv.training.dist import DistContext

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ctx = DistContext(rank=rank, world=2, device=__import__("torch").device("cpu"))

    def save():
        raise OSError(28, "No space left on device")

    try:
        ctx.on_main(save)
    except OSError:
        print(f"rank {rank}: OSError", flush=True)
    except NdeconvError as err:
        print(f"rank {rank}: NdeconvError {err}", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow  # two gloo ranks: about 14 s
def test_a_plain_error_on_rank0_stops_every_rank(tmp_path: Path) -> None:
    # Rank 0 alone writes files; a full disk there must end the other ranks too, not leave them waiting.
    driver = tmp_path / "on_main.py"
    driver.write_text(ON_MAIN_FAILS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: OSError" in proc.stdout
    assert "rank 1: NdeconvError rank 0 failed: OSError" in proc.stdout and "No space left" in proc.stdout
