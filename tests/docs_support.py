"""The docs pages' ```python blocks, which the docs tests run as written."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def python_blocks(page: pathlib.Path) -> list[str]:
    """The code of every ```python block of ``page``, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
