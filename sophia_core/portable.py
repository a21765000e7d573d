"""A framework-neutral file for Sophia's optimizer state (no pickle).

One file holds everything needed to continue a run in any backend: the
shared step counter, the momentum ``m`` and Hessian EMA ``h`` of every
parameter (in the order the exporting optimizer lists its parameters), and
the hyperparameters as a JSON object. It is a numpy ``.npz`` archive read
with ``allow_pickle=False``; only numpy and the standard library are used,
so the core stays framework-free. Adapters convert their tensors to numpy
(``export_state``) and back (``import_state``).

Layout (format version 1)::

    __format__          "sophia-xp-portable-state"       0-d unicode
    __version__         1                                0-d int64
    step                completed steps                  0-d int64
    num_tensors         n                                0-d int64
    hyperparameters     JSON object                      0-d unicode
    m/0 ... m/{n-1}     momentum, float16/32/64          parameter shapes
    h/0 ... h/{n-1}     Hessian EMA, same shapes and dtypes as m/i

Any malformed or mismatched file raises ``ValueError`` naming what does not
match: the missing key, the tensor index with expected and found
shape/dtype, the unsupported version.

Example::

    >>> import numpy as np, tempfile, os
    >>> from sophia_core import portable
    >>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
    >>> portable.save_state(path, step=3, ms=[np.zeros(2)], hs=[np.ones(2)],
    ...                     hyperparameters={"lr": 1e-3})
    >>> state = portable.load_state(path, expect_shapes=[(2,)])
    >>> state.step, state.hs[0].tolist(), state.hyperparameters["lr"]
    (3, [1.0, 1.0], 0.001)
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import zipfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ._hyperparameters import DEFAULTS, validate_hyperparameters

__all__ = ["FORMAT", "VERSION", "PortableState", "load_state", "save_state"]

#: Value of the ``__format__`` entry: tells our files from other npz archives.
FORMAT = "sophia-xp-portable-state"
#: Format version written by :func:`save_state`; :func:`load_state` reads it.
VERSION = 1
#: Dtypes a state tensor may have (numpy has no bfloat16; bf16 parameters
#: keep float32 state anyway, SPEC section 1).
STATE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_HEADER_KEYS = ("__format__", "__version__", "step", "num_tensors", "hyperparameters")


class PortableState(NamedTuple):
    """The contents of a portable state file, as numpy arrays and Python values."""

    #: Completed optimizer steps (the shared counter ``t``).
    step: int
    #: Momentum per parameter, in the exporting optimizer's parameter order.
    ms: list[np.ndarray]
    #: Hessian EMA per parameter, same order, shapes and dtypes as ``ms``.
    hs: list[np.ndarray]
    #: Hyperparameters in the core's spelling (JSON values).
    hyperparameters: dict[str, Any]


def _as_step(step: Any) -> int:
    """A non-negative integer step from an int, a 0-d array or an integral float."""
    value = step
    if not isinstance(value, numbers.Number):
        value = np.asarray(value)
        if value.shape != ():
            raise ValueError(f"step must be a scalar, got an array of shape {value.shape}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif math.isfinite(value) and float(value).is_integer():
        value = int(value)
    else:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if value < 0:
        raise ValueError(f"step must be a non-negative integer, got {value}")
    return value


def _as_state_array(kind: str, index: int, array: Any) -> np.ndarray:
    try:
        result = np.asarray(array)
    except Exception as exc:  # a tensor numpy cannot read (e.g. bfloat16)
        raise ValueError(
            f"{kind}[{index}] cannot be converted to a numpy array ({exc}); "
            "convert it to float32 first"
        ) from exc
    if result.dtype not in STATE_DTYPES:
        allowed = ", ".join(str(d) for d in STATE_DTYPES)
        raise ValueError(f"{kind}[{index}] has dtype {result.dtype}; state dtypes are {allowed}")
    return result


def _check_pairs(ms: Sequence[np.ndarray], hs: Sequence[np.ndarray], where: str) -> None:
    if len(ms) != len(hs):
        raise ValueError(f"{where}: {len(ms)} momentum tensors but {len(hs)} Hessian tensors")
    for i, (m, h) in enumerate(zip(ms, hs, strict=True)):
        if m.shape != h.shape or m.dtype != h.dtype:
            raise ValueError(
                f"{where}: tensor {i}: m has shape {m.shape} and dtype {m.dtype} "
                f"but h has shape {h.shape} and dtype {h.dtype}"
            )


def _check_hyperparameters(hyperparameters: Any, where: str) -> dict[str, Any]:
    if not isinstance(hyperparameters, dict):
        raise ValueError(f"{where}: hyperparameters must be a dict, got {type(hyperparameters)}")
    for key, value in hyperparameters.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: hyperparameter names must be strings, got {key!r}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(
                f"{where}: hyperparameter {key!r} has a value of type {type(value).__name__}; "
                "only None, bool, int, float and str are portable (resolve schedules "
                "to a number or leave them out)"
            )
    known = {k: v for k, v in hyperparameters.items() if k in DEFAULTS and v is not None}
    try:
        validate_hyperparameters(**known)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return dict(hyperparameters)


def save_state(
    path: str | os.PathLike[str],
    *,
    step: Any,
    ms: Sequence[Any],
    hs: Sequence[Any],
    hyperparameters: dict[str, Any],
) -> None:
    """Write a portable state file to ``path`` (exactly that name; written atomically).

    ``step`` is the number of completed steps (int, 0-d array or integral
    float). ``ms`` and ``hs`` hold one array per parameter (anything
    ``numpy.asarray`` converts: numpy, CPU torch tensors, jax arrays, eager
    TF tensors) with float16/32/64 dtype; ``hs[i]`` must match ``ms[i]`` in
    shape and dtype. ``hyperparameters`` maps names (the core's spelling)
    to None/bool/int/float/str; core names are validated.

    Raises ValueError naming the offending value.
    """
    where = "save_state"
    step = _as_step(step)
    ms = [_as_state_array("ms", i, m) for i, m in enumerate(ms)]
    hs = [_as_state_array("hs", i, h) for i, h in enumerate(hs)]
    _check_pairs(ms, hs, where)
    hyperparameters = _check_hyperparameters(hyperparameters, where)
    arrays: dict[str, np.ndarray] = {
        "__format__": np.asarray(FORMAT),
        "__version__": np.asarray(VERSION, dtype=np.int64),
        "step": np.asarray(step, dtype=np.int64),
        "num_tensors": np.asarray(len(ms), dtype=np.int64),
        "hyperparameters": np.asarray(json.dumps(hyperparameters, sort_keys=True)),
    }
    for i, (m, h) in enumerate(zip(ms, hs, strict=True)):
        arrays[f"m/{i}"] = m
        arrays[f"h/{i}"] = h
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sophia-state-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: savez adds no ".npz"
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _scalar(archive: Any, key: str, kind: str, where: str) -> Any:
    value = archive[key]
    if value.shape != () or value.dtype.kind != kind:
        raise ValueError(
            f"{where}: entry {key!r} must be a scalar of kind {kind!r}, "
            f"got shape {value.shape} and dtype {value.dtype}"
        )
    return value.item()


def load_state(
    path: str | os.PathLike[str],
    *,
    expect_shapes: Sequence[Sequence[int]] | None = None,
    expect_dtypes: Sequence[Any] | None = None,
) -> PortableState:
    """Read a portable state file written by :func:`save_state`.

    ``expect_shapes`` (one shape per parameter, in the importer's order) and
    ``expect_dtypes`` (one state dtype per parameter) are checked when given:
    the count and every tensor must match. Nothing is unpickled.

    Raises ValueError naming the missing key, the unsupported version, or
    the tensor index with expected and found shape/dtype.
    """
    where = f"load_state({os.fspath(path)!r})"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{where}: not a readable npz file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: not an npz archive (a plain .npy array?)")
    with archive:
        keys = set(archive.files)
        for key in _HEADER_KEYS:
            if key not in keys:
                raise ValueError(f"{where}: missing key {key!r} (not a portable state file?)")
        try:
            fmt = _scalar(archive, "__format__", "U", where)
            if fmt != FORMAT:
                raise ValueError(f"{where}: __format__ is {fmt!r}, expected {FORMAT!r}")
            version = _scalar(archive, "__version__", "i", where)
            if version != VERSION:
                raise ValueError(
                    f"{where}: format version {version} is not supported (this reader "
                    f"reads version {VERSION})"
                )
            step = _scalar(archive, "step", "i", where)
            if step < 0:
                raise ValueError(f"{where}: step must be >= 0, got {step}")
            count = _scalar(archive, "num_tensors", "i", where)
            try:
                hyperparameters = json.loads(_scalar(archive, "hyperparameters", "U", where))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: hyperparameters are not valid JSON ({exc})") from exc
            hyperparameters = _check_hyperparameters(hyperparameters, where)
            expected_keys = {f"{kind}/{i}" for kind in "mh" for i in range(count)}
            for key in sorted(expected_keys - keys):
                raise ValueError(f"{where}: missing key {key!r} (num_tensors is {count})")
            unexpected = sorted(keys - expected_keys - set(_HEADER_KEYS))
            if unexpected:
                raise ValueError(f"{where}: unexpected keys {unexpected}")
            ms = [archive[f"m/{i}"] for i in range(count)]
            hs = [archive[f"h/{i}"] for i in range(count)]
        except ValueError as exc:
            if str(exc).startswith(where):
                raise
            # np.load refuses object arrays with allow_pickle=False
            raise ValueError(f"{where}: {exc}") from exc
        except (OSError, zipfile.BadZipFile, EOFError) as exc:  # a damaged member
            raise ValueError(f"{where}: damaged archive ({exc})") from exc
    for kind, arrays in (("m", ms), ("h", hs)):
        for i, array in enumerate(arrays):
            if array.dtype not in STATE_DTYPES:
                raise ValueError(f"{where}: tensor {i}: {kind} has unsupported dtype {array.dtype}")
    _check_pairs(ms, hs, where)
    if expect_shapes is not None:
        shapes = [tuple(int(n) for n in shape) for shape in expect_shapes]
        _check_expected("shape", shapes, [m.shape for m in ms], where)
    if expect_dtypes is not None:
        dtypes = [np.dtype(d) for d in expect_dtypes]
        _check_expected("dtype", dtypes, [m.dtype for m in ms], where)
    return PortableState(step=int(step), ms=ms, hs=hs, hyperparameters=hyperparameters)


def _check_expected(what: str, expected: list, found: list, where: str) -> None:
    """Raise ValueError naming the tensor whose ``what`` differs from ``expected``."""
    if len(expected) != len(found):
        raise ValueError(
            f"{where}: the file holds state for {len(found)} tensors, expected {len(expected)}"
        )
    for i, (want, got) in enumerate(zip(expected, found, strict=True)):
        if want != got:
            raise ValueError(f"{where}: tensor {i}: expected {what} {want}, got {got}")
