"""The demo's corpus: the CPython standard library's own source text.

Every framework trains on exactly the same bytes, batches and validation
windows, all drawn here with numpy from fixed seeds.

Corpus: every top-level ``*.py`` file of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``), sorted by name. Every tenth
file (index 9, 19, ...) is held out for validation, so validation text comes
from modules the model never trained on. The corpus depends on the Python
version (about 4.7 MB for 3.11); :func:`load_corpus` reports a digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import numpy as np

__all__ = ["Batches", "Corpus", "load_corpus", "load_python_sources"]

#: Byte-level model: the vocabulary is the 256 byte values.
VOCAB_SIZE = 256
#: Every ``VALIDATION_EVERY``-th file goes to the validation split.
VALIDATION_EVERY = 10
#: Separator between files (a form feed never occurs in the sources).
SEPARATOR = b"\n\x0c\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and validation bytes as uint8 arrays."""

    train: np.ndarray
    validation: np.ndarray
    files: tuple[str, ...]
    digest: str
    #: What the files are, for :meth:`describe`.
    source: str = "stdlib"

    def describe(self) -> str:
        return (
            f"{len(self.files)} {self.source} files, {self.train.size / 1e6:.2f} MB train / "
            f"{self.validation.size / 1e6:.2f} MB validation, sha256 {self.digest[:12]}"
        )


def stdlib_files(root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """The corpus files, in their fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library folder {root}")
    return files


def load_corpus(root: str | pathlib.Path | None = None) -> Corpus:
    """Read the standard library's sources and split them by file."""
    files = stdlib_files(root)
    train, validation = [], []
    digest = hashlib.sha256()
    for index, path in enumerate(files):
        text = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + text)
        split = validation if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train
        split.append(text)
    as_array = lambda parts: np.frombuffer(SEPARATOR.join(parts), dtype=np.uint8)  # noqa: E731
    return Corpus(
        train=as_array(train),
        validation=as_array(validation),
        files=tuple(p.name for p in files),
        digest=digest.hexdigest(),
    )


def python_source_files(max_bytes: int) -> list[pathlib.Path]:
    """Every ``*.py`` file of the interpreter's standard library and site-packages.

    Recursive, in a fixed order (standard library first, each root sorted by
    path); when they hold more than ``max_bytes``, every n-th file so that
    the total stays under it (the sample spans all packages).
    """
    paths = sysconfig.get_paths()
    roots = list(dict.fromkeys(pathlib.Path(paths[k]).resolve()
                               for k in ("stdlib", "purelib", "platlib")))
    files: list[pathlib.Path] = []
    for index, root in enumerate(roots):
        found = sorted(root.rglob("*.py"))
        if index == 0:  # the standard library folder holds site-packages too
            found = [f for f in found if not {"site-packages", "dist-packages"}
                     & set(f.relative_to(root).parts)]
        files += found
    files = list(dict.fromkeys(f for f in files if f.is_file()))
    sizes = [f.stat().st_size for f in files]
    stride = max(1, -(-sum(sizes) // max_bytes))
    chosen, total = [], 0
    for f, size in zip(files[::stride], sizes[::stride], strict=True):
        if total + size > max_bytes:
            break
        chosen.append(f)
        total += size
    if not chosen:
        raise FileNotFoundError("no *.py files in the interpreter's library folders")
    return chosen


def load_python_sources(max_bytes: int = 64 * 2**20) -> Corpus:
    """A larger corpus: the Python sources installed with the interpreter.

    Standard library and site-packages, recursively (:func:`python_source_files`);
    every tenth file held out for validation, as in :func:`load_corpus`.
    Exists on any machine with Python, offline included; its content depends
    on what is installed (:meth:`Corpus.describe` reports a digest).
    """
    train, validation, names = [], [], []
    digest = hashlib.sha256()
    for index, path in enumerate(python_source_files(max_bytes)):
        text = path.read_bytes()
        digest.update(str(path).encode() + b"\0" + text)
        names.append(str(path))
        split = validation if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train
        split.append(text)
    as_array = lambda parts: np.frombuffer(SEPARATOR.join(parts), dtype=np.uint8)  # noqa: E731
    return Corpus(train=as_array(train), validation=as_array(validation), files=tuple(names),
                  digest=digest.hexdigest(), source="Python (stdlib and site-packages)")


class Batches:
    """Deterministic batches: step ``i`` always gets the same windows.

    Inputs are ``context`` bytes, targets the same window shifted by one;
    both int32 arrays of shape ``(batch_size, context)``.
    """

    def __init__(self, corpus: Corpus, *, batch_size: int, context: int, seed: int,
                 validation_windows: int) -> None:
        self.corpus = corpus
        self.batch_size = batch_size
        self.context = context
        self.seed = seed
        rng = np.random.default_rng([seed, 1])
        starts = rng.integers(0, corpus.validation.size - context - 1, size=validation_windows)
        self._validation = self._windows(corpus.validation, np.sort(starts))

    def _windows(self, data: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = starts[:, None] + np.arange(self.context + 1)[None, :]
        chunk = data[index].astype(np.int32)
        return chunk[:, :-1], chunk[:, 1:]

    def train(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of step ``step`` (0-based)."""
        rng = np.random.default_rng([self.seed, 0, step])
        starts = rng.integers(0, self.corpus.train.size - self.context - 1, size=self.batch_size)
        return self._windows(self.corpus.train, starts)

    def validation(self, chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The fixed validation windows, in chunks of at most ``chunk`` rows."""
        x, y = self._validation
        return [(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
