"""Show library warnings (untrained whitening, train mode, unfused BatchNorms) as one stderr line each."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["warnings_to_stderr"]


@contextmanager
def warnings_to_stderr(command: str, category: type[Warning] = UserWarning) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        try:
            yield
        finally:
            seen: set[str] = set()
            for w in caught:
                text = str(w.message)
                if issubclass(w.category, category) and text not in seen:
                    seen.add(text)
                    print(f"ndeconv {command}: warning: {text}", file=sys.stderr)
