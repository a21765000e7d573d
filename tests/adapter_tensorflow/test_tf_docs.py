"""The runnable examples of docs/frameworks/tensorflow.md (```python blocks) run."""

from __future__ import annotations

import pathlib
import re

import pytest
from tf_support import tf  # noqa: F401  (sets the Keras backend, or skips)

PAGE = pathlib.Path(__file__).parent.parent.parent / "docs" / "frameworks" / "tensorflow.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_documented_example_runs(code):
    exec(compile(code, str(PAGE), "exec"), {"__name__": "__docs__"})
