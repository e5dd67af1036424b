"""``ndeconv.zoo`` and ``ndeconv.convert`` in a source tree.

The design keeps the zoo and the converter at the repository's top level (``zoo/``, ``convert/``); the wheel
installs them inside this package (pyproject's ``package-dir``), so its only top-level package is ``ndeconv`` and
no file of the unrelated PyPI projects ``zoo`` and ``convert`` is touched. In a clone used without installing
(torch.hub's ``source='local'``, ``PYTHONPATH=.``) those folders sit beside this package instead: this finder
resolves exactly those two names there, and nothing else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

SUBPACKAGES = ("zoo", "convert")


class SiblingFinder(importlib.abc.MetaPathFinder):
    """Finds ``ndeconv.zoo`` / ``ndeconv.convert`` (and their submodules, through the package's ``__path__``) in
    the folders beside ``ndeconv/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's signature
        package, _, name = fullname.partition(".")
        if package != "ndeconv" or name not in SUBPACKAGES:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [str(self.root)])


def mount(package_dir: Path) -> None:
    """Install the finder when ``package_dir`` (the ``ndeconv`` folder) lacks the subpackages and its parent
    holds them, i.e. in a clone; an installed wheel or an editable install resolves them itself."""
    root = package_dir.parent
    if all((package_dir / name).is_dir() for name in SUBPACKAGES):
        return
    if not all((root / name / "__init__.py").is_file() for name in SUBPACKAGES):
        return
    # First in line: these two names must resolve beside *this* ndeconv, also when an editable install of another
    # checkout maps them elsewhere (torch.hub loading a clone on a machine with a dev install).
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, SiblingFinder)]
    sys.meta_path.insert(0, SiblingFinder(root))
