"""What pip installs: a lean wheel whose only top-level package is ``ndeconv`` (the repository's ``zoo/`` and
``convert/`` inside it as ``ndeconv.zoo`` / ``ndeconv.convert``, never PyPI's unrelated ``zoo`` and ``convert``),
no weights, and a loader that tells a pip user in one line how to get them (``NDECONV_WEIGHTS`` or the Hub)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import default_tag

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the sources, as a clone has them (the weights linked in)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE", "hubconf.py"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("ndeconv", "zoo", "convert"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    (source / "zoo" / "weights").symlink_to(ROOT / "zoo" / "weights", target_is_directory=True)
    return source


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    # Built from a copy of the sources (setuptools builds in the source tree and would leave build/ there, whose
    # stale files a later wheel could pick up); the weights are linked in, so leaving them out is the project
    # configuration's doing.
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(out)],
        capture_output=True, text=True, timeout=600, cwd=out)
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = out.glob("ndeconv-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as pip would lay it into site-packages."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_wheel_has_only_ndeconv_at_top_level_and_no_weights(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"ndeconv"}
    for module in ("ndeconv/zoo/__init__.py", "ndeconv/zoo/_pretrained.py", "ndeconv/convert/fold.py",
                   "ndeconv/convert/export.py", "ndeconv/layers/fast_deconv.py", "ndeconv/commands/train.py"):
        assert module in names
    assert not [n for n in names if n.endswith((".safetensors", ".png", ".jsonl"))]
    assert wheel.stat().st_size < 5 * 2**20


def _run_installed(installed: Path, tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("NDECONV_WEIGHTS", "PYTHONPATH")}
    environ.update(PYTHONPATH=str(installed), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=environ)


LOAD = """
import timm, ndeconv
assert ndeconv.__file__.startswith({site!r}), ndeconv.__file__
assert ndeconv.zoo.__file__.startswith({site!r}), ndeconv.zoo.__file__
model = timm.create_model('resnet18_deconv', pretrained=True)
print('FILE', model.pretrained_cfg['file'])
"""


@pytest.mark.slow  # a fresh interpreter importing torch from the unpacked wheel: about 7 s
def test_pip_install_without_weights_says_how_to_get_them(installed, tmp_path):
    run = _run_installed(installed, tmp_path, LOAD.format(site=str(installed)))
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "no weights in this install" in last and "NDECONV_WEIGHTS" in last and "hf download" in last, last


@pytest.mark.slow  # a fresh interpreter importing torch from the unpacked wheel: about 7 s
def test_pip_install_reads_weights_named_by_the_environment(installed, tmp_path):
    weights = ROOT / "zoo" / "weights"
    run = _run_installed(installed, tmp_path, LOAD.format(site=str(installed)), NDECONV_WEIGHTS=str(weights))
    assert run.returncode == 0, run.stderr[-2000:]
    # The default tag's folder, the one timm.create_model('resnet18_deconv', pretrained=True) names.
    default = weights / f"resnet18_deconv.{default_tag('resnet18_deconv')}" / "model.safetensors"
    assert f"FILE {default}" in run.stdout


def test_a_clone_resolves_its_own_zoo_and_converter(source, tmp_path):
    # torch.hub's source='local' on a clone: ndeconv.zoo and ndeconv.convert are the clone's folders beside its
    # ndeconv/, also when an editable install of another checkout (this one, in the test run) maps those names.
    code = f"""
import torch
model = torch.hub.load({str(source)!r}, 'resnet18_deconv', source='local', pretrained=False)
import ndeconv, ndeconv.zoo, ndeconv.convert
for module in (ndeconv, ndeconv.zoo, ndeconv.convert):
    assert module.__file__.startswith({str(source)!r}), module.__file__
print('OK')
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-2000:]
