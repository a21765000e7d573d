"""docs/portable-state.md: its code blocks run, and its limits are the module's."""

from __future__ import annotations

from docs_support import DOCS, python_blocks

from sophia_core import portable

PAGE = DOCS / "portable-state.md"


def test_page_code_blocks_run_in_order(capsys):
    blocks = python_blocks(PAGE)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["['attn.k', 'attn.q'] 1200 120", "['params.attn.key', 'params.attn.query']"]


def test_page_states_the_module_limits():
    text = PAGE.read_text()
    for figure in (f"{portable.MAX_HEADER_CHARS:,} characters",
                   f"at most {portable.MAX_NPY_HEADER_BYTES:,} bytes",
                   f"{portable.MAX_DEFLATE_RATIO:,}x its compressed size",
                   f"at most {portable.MAX_EXPANSION}x the file size",
                   f"at most {portable.MAX_JSON_CONTAINERS} arrays/objects nested at most "
                   f"{portable.MAX_JSON_DEPTH} deep",
                   f"at most {portable.MAX_NAME_LENGTH:,} characters"):
        assert figure in text, figure
