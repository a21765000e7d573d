"""The PyTorch page's code blocks and the torch examples run as written."""

from __future__ import annotations

import runpy

import pytest
from backend_support import require
from docs_support import DOCS, python_blocks

torch = require("torch")

PAGE = DOCS / "frameworks" / "torch.md"
BLOCKS = python_blocks(PAGE)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_documented_example_runs(code):
    exec(compile(code, str(PAGE), "exec"), {"__name__": "__docs__"})


def test_the_standard_loop_example_learns():
    example = runpy.run_path(str(DOCS / "examples" / "torch_sophia_g.py"))
    loss = example["main"](["--steps", "150"])
    assert loss < 1.0  # log(16) = 2.77 at the start


def test_the_trainer_example_learns():
    example = runpy.run_path(str(DOCS / "examples" / "torch_hf_trainer.py"))
    assert example["main"](["--steps", "40"]) < 2.0
