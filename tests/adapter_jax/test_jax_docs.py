"""The JAX page's code blocks and the runnable examples, at tiny sizes."""

from __future__ import annotations

import runpy

import jax
import jax.numpy as jnp
import numpy as np
from docs_support import DOCS, python_blocks


def test_jax_page_code_blocks_run_in_order(capsys):
    blocks = python_blocks(DOCS / "frameworks" / "jax.md")
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "jax.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "loss after 20 steps" in out and "nnx loss" in out


def test_plain_jax_example_learns():
    example = runpy.run_path(str(DOCS / "examples" / "jax_sophia_g.py"))
    first, last = example["main"](["--steps", "40", "--batch", "32", "--width", "16"])
    assert np.isfinite(last) and last < first


def test_masked_example_refreshes_the_matrices_and_learns():
    example = runpy.run_path(str(DOCS / "examples" / "jax_masked_sophia.py"))
    result = example["main"](["--steps", "40", "--width", "16"])
    state = result["state"]
    assert int(state.hessian_refreshes) == 4
    assert {type(h).__name__ for h in jax.tree.leaves(
        state.h, is_leaf=lambda x: type(x).__name__ == "MaskedNode")} == {
        "MaskedNode", "ArrayImpl"}
    assert all(bool(jnp.all(h > 0)) for h in jax.tree.leaves(state.h))
    assert result["last"] < result["first"] / 2


def test_flax_nnx_example_refreshes_and_learns():
    example = runpy.run_path(str(DOCS / "examples" / "flax_nnx_sophia.py"))
    result = example["main"](["--steps", "12", "--width", "8"])
    state = result["state"]
    assert int(state.count) == 12 and int(state.hessian_refreshes) == 3
    assert all(bool(jnp.any(h != 0)) for h in jax.tree.leaves(state.h))
    assert result["loss"] < 0.6


def test_docstring_examples_run():
    import doctest

    import sophia_jax
    from sophia_jax import _transform

    for module in (sophia_jax, _transform):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)
