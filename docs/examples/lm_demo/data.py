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

__all__ = ["Batches", "Corpus", "load_corpus"]

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

    def describe(self) -> str:
        return (
            f"{len(self.files)} stdlib files, {self.train.size / 1e6:.2f} MB train / "
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
