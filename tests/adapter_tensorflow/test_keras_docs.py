"""The Keras page's examples (```python blocks) and the example script run.

Backend-neutral, like the page: ``test_keras_backends.py`` runs this module
on JAX and torch too.
"""

from __future__ import annotations

import runpy

import pytest
from docs_support import DOCS, python_blocks
from keras_support import keras  # noqa: F401  (sets the Keras backend, or skips)

PAGE = DOCS / "frameworks" / "tensorflow.md"
BLOCKS = python_blocks(PAGE)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_documented_example_runs(code):
    exec(compile(code, str(PAGE), "exec"), {"__name__": "__docs__"})


def test_the_example_script_trains():
    example = runpy.run_path(str(DOCS / "examples" / "keras_sophia_g_fit.py"))
    losses = example["main"](epochs=2, verbose=0)
    assert losses[-1] < 0.5 * losses[0]
