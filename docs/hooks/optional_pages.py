"""mkdocs hook: pages from other branches are optional until they are merged.

The adapters' pages (``docs/frameworks/*.md``), the conformance report and
the adapters' API pages are written on other branches. Until they are in the
checkout the site must still build with ``--strict``; once they are, they
appear with no change here. For each optional page that is missing, this
hook drops its nav entry and turns links to it into plain text. An API page
counts as present only when its package is in ``backends/``. Links to any
other missing page still fail the strict build.
"""

from __future__ import annotations

import logging
import pathlib
import posixpath
import re

log = logging.getLogger("mkdocs.hooks.optional_pages")

#: Pages another branch provides, and the folder (if any) they also need.
OPTIONAL: dict[str, str | None] = {
    "frameworks/torch.md": None,
    "frameworks/jax.md": None,
    "frameworks/tensorflow.md": None,
    "conformance.md": None,
    "api/torch.md": "backends/sophia_torch",
    "api/jax.md": "backends/sophia_jax",
    "api/tensorflow.md": "backends/sophia_tf",
}

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+\.md)(#[^)\s]*)?\)")
_missing: set[str] = set()


def _is_missing(page: str, docs: pathlib.Path, root: pathlib.Path) -> bool:
    if page not in OPTIONAL:
        return False
    needs = OPTIONAL[page]
    return not (docs / page).is_file() or (needs is not None and not (root / needs).is_dir())


def _prune(items: list) -> list:
    kept = []
    for item in items:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, list):
                value = _prune(value)
                if value:
                    kept.append({title: value})
                continue
            if isinstance(value, str) and value in _missing:
                log.info("optional_pages: %s is not in this checkout; left out of the nav", value)
                continue
        kept.append(item)
    return kept


def on_config(config):
    docs = pathlib.Path(config["docs_dir"])
    root = pathlib.Path(config["config_file_path"]).parent
    _missing.clear()
    _missing.update(page for page in OPTIONAL if _is_missing(page, docs, root))
    if config["nav"]:
        config["nav"] = _prune(config["nav"])
    return config


def on_files(files, config):
    """Drop API pages whose package is missing (mkdocstrings would fail on them)."""
    for page in _missing:
        found = files.get_file_from_path(page)
        if found is not None:
            files.remove(found)
    return files


def on_page_markdown(markdown, page, config, files):
    """Links to a missing optional page become their plain text."""
    here = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(here, match.group(2)))
        return match.group(1) if target in _missing else match.group(0)

    return _LINK.sub(replace, markdown)
