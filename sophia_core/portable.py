"""A framework-neutral file for Sophia's optimizer state (no pickle).

One file holds everything needed to continue a run in any backend: the
shared step counter, the momentum ``m`` and Hessian EMA ``h`` of every
parameter under the parameter's *name*, the optimizer's counters and the
hyperparameters. It is a numpy ``.npz`` archive; only numpy and the standard
library are used, so the core stays framework-free. Adapters convert their
tensors to numpy (``export_state``) and back (``import_state``).

Layout (format version 2)::

    __format__.npy      "sophia-xp-portable-state"          0-d unicode
    __version__.npy     2                                   0-d int64
    header.npy          JSON object (below)                 0-d unicode
    m/0.npy ... m/{n-1}.npy   momentum, float16/32/64       parameter shapes
    h/0.npy ... h/{n-1}.npy   Hessian EMA, same shape and dtype as m/i

    header = {"step": completed steps (0 <= step < 2**63),
              "names": [name of tensor 0, ..., name of tensor n-1],
              "hyperparameters": {core name: null/bool/int/float/str},
              "counters": {name: int or float}}

Members are stored uncompressed (``numpy.savez``); a reader also accepts
deflate (``numpy.savez_compressed``) and nothing else.

**Names.** Tensor ``i`` belongs to the parameter ``names[i]``. Each adapter
derives names the same way (:func:`name_from_path` joins path parts with
``"."``): torch the ``param_names`` of the param groups when the optimizer
was given ``named_parameters()``, else the flat index ``"0", "1", ...`` in
``param_groups`` order; JAX the leaf's ``jax.tree_util.keystr(path,
simple=True, separator=".")`` (a list pytree gives ``"0", "1", ...``); Keras
``variable.path`` with ``"/"`` replaced by ``"."``. Without names the
writer uses ``"0", "1", ...``. Names are unique, non-empty, printable and
at most :data:`MAX_NAME_LENGTH` characters.

**Matching.** ``load_state(path, expect={name: shape, ...})`` matches by
name: the result follows the order of ``expect`` (the importer's order), and
a ValueError lists the names missing from the file and the unexpected ones.
This is what makes a torch export ``[q, k]`` load correctly into a JAX
pytree ``{k, q}`` (sorted keys). ``expect_shapes=[shape, ...]`` keeps the
version-1 positional matching (file order), which is only safe when both
sides list parameters in the same order.

**Limits.** A file is untrusted input. Every malformed file raises
``ValueError`` naming the problem, and nothing is allocated before its size
is known to be sane: duplicate members, members other than the ones above,
encrypted members and compression methods other than stored/deflate are
refused from the zip directory; a member's declared size must be physically
possible (stored: present in the file; deflate: at most
:data:`MAX_DEFLATE_RATIO` times its compressed size); the number of tensors
must match the members present (so it is bounded by the file size); every
``.npy`` header is read from the first bytes of its member (at most
:data:`MAX_NPY_HEADER_BYTES`) and its dtype, shape and byte count are checked
against the zip entry, against the expected shapes and dtypes when given,
and otherwise against :data:`MAX_EXPANSION` times the file size, before any
data is decompressed; the header is at most :data:`MAX_HEADER_CHARS`
characters, holds no more strings than the archive's members can use (plus
1,024 for keys) and at most :data:`MAX_JSON_CONTAINERS` JSON objects/arrays
nested at most :data:`MAX_JSON_DEPTH` deep, all checked before it is
parsed; NaN/Inf state is refused (on save too). Object arrays are never
read, ``np.load`` is never called on a member.

**Version 1** files (``step``, ``num_tensors`` and ``hyperparameters``
entries instead of ``header``) are still read: their names are ``"0", "1",
...`` and their counters empty.

Example::

    >>> import numpy as np, tempfile, os
    >>> from sophia_core import portable
    >>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
    >>> portable.save_state(path, step=3, ms=[np.zeros(2), np.zeros(())],
    ...                     hs=[np.ones(2), np.ones(())], hyperparameters={"lr": 1e-3},
    ...                     names=["q", "k"], counters={"hessian_refreshes": 1})
    >>> state = portable.load_state(path, expect={"k": (), "q": (2,)})
    >>> state.names, state.hs[1].tolist(), state.step, state.counters
    (['k', 'q'], [1.0, 1.0], 3, {'hessian_refreshes': 1})
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._hyperparameters import DEFAULTS, validate_hyperparameters

__all__ = [
    "FORMAT",
    "MAX_DEFLATE_RATIO",
    "MAX_EXPANSION",
    "MAX_HEADER_CHARS",
    "MAX_JSON_CONTAINERS",
    "MAX_JSON_DEPTH",
    "MAX_NAME_LENGTH",
    "MAX_NPY_HEADER_BYTES",
    "MAX_STEP",
    "READ_VERSIONS",
    "STATE_DTYPES",
    "VERSION",
    "PortableState",
    "load_state",
    "name_from_path",
    "save_state",
]

#: Value of the ``__format__`` entry: tells our files from other npz archives.
FORMAT = "sophia-xp-portable-state"
#: Format version written by :func:`save_state`.
VERSION = 2
#: Format versions :func:`load_state` reads.
READ_VERSIONS = (1, 2)
#: Dtypes a state tensor may have (numpy has no bfloat16; bf16 parameters
#: keep float32 state anyway, SPEC section 1). Either byte order is read.
STATE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Longest parameter or counter name, in characters.
MAX_NAME_LENGTH = 1024
#: Largest step (and integer counter): the int64 range every host can hold.
MAX_STEP = 2**63 - 1
#: Longest JSON header (v2) or hyperparameters entry (v1), in characters:
#: about 20,000 parameter names of 100 characters.
MAX_HEADER_CHARS = 2**21
#: Most JSON objects/arrays in a header (v2 uses 4) and deepest nesting (2).
MAX_JSON_CONTAINERS = 64
MAX_JSON_DEPTH = 8
#: Longest ``.npy`` header (numpy pads a state tensor's to 128 bytes).
MAX_NPY_HEADER_BYTES = 4096
#: Deflate cannot expand data more than ~1032:1; a larger claim is a lie.
MAX_DEFLATE_RATIO = 1032
#: Without expected shapes, the tensors may declare at most this many times
#: the file's size in bytes (files written by :func:`save_state` are stored
#: uncompressed, ratio < 1). With expected shapes every size is exact.
MAX_EXPANSION = 8

_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_V1_KEYS = ("__format__", "__version__", "step", "num_tensors", "hyperparameters")
_V2_KEYS = ("__format__", "__version__", "header")
_HEADER_FIELDS = ("step", "names", "hyperparameters", "counters")
_CHUNK = 1 << 20
#: JSON strings a header may hold besides the names (hyperparameter and
#: counter keys and values).
_EXTRA_STRINGS = 1024
#: A JSON string (possessive, so an unterminated string cannot backtrack).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\(?:.|\Z))*+(?:"|\Z)', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


class PortableState(NamedTuple):
    """The contents of a portable state file, as numpy arrays and Python values."""

    #: Completed optimizer steps (the shared counter ``t``).
    step: int
    #: Momentum per parameter, in the order of ``names``.
    ms: list[np.ndarray]
    #: Hessian EMA per parameter, same order, shapes and dtypes as ``ms``.
    hs: list[np.ndarray]
    #: Hyperparameters in the core's spelling (JSON values).
    hyperparameters: dict[str, Any]
    #: Parameter name of each tensor (the importer's order when matched by name).
    names: list[str]
    #: Counters (``hessian_refreshes``, ``rejected_hessian_coordinates``, ...).
    counters: dict[str, int | float]
    #: Format version of the file that was read.
    version: int


class _Malformed(ValueError):
    """A problem with the file; :func:`load_state` prefixes the path."""


# -- names, steps, counters, hyperparameters (shared by save and load) --------


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} has {len(name)} characters (at most {MAX_NAME_LENGTH})")
    if not name.isprintable():
        raise ValueError(f"{what} {name!r} contains a non-printable character")
    return name


def _check_names(names: Any, count: int) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"names must be a list of str, got {type(names).__name__}")
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} tensors")
    checked = [_check_name(name, f"names[{i}]") for i, name in enumerate(names)]
    seen: dict[str, int] = {}
    for i, name in enumerate(checked):
        if name in seen:
            raise ValueError(f"names[{i}] repeats names[{seen[name]}] ({name!r}); names are unique")
        seen[name] = i
    return checked


def name_from_path(parts: Iterable[str | int]) -> str:
    """The portable name of a parameter from the parts of its path, joined with ``"."``.

    ``parts`` are strings or integers (list indices), e.g. a torch name split
    at dots, a JAX key path's keys, a Keras ``variable.path.split("/")``.
    Raises TypeError for a part of another type (or a bare string) and
    ValueError for an empty part or a name that breaks the rules (too long,
    not printable).

    >>> name_from_path(["decoder", "layers", 0, "kernel"])
    'decoder.layers.0.kernel'
    """
    if isinstance(parts, (str, bytes)):
        raise TypeError(f"parts must be an iterable of path parts, not a string: {parts!r}")
    texts = []
    for i, part in enumerate(parts):
        if isinstance(part, bool) or not isinstance(part, (str, numbers.Integral)):
            raise TypeError(f"path part {i} must be a str or int, got {type(part).__name__}")
        text = part if isinstance(part, str) else str(int(part))
        if not text:
            raise ValueError(f"path part {i} is empty")
        texts.append(text)
    return _check_name(".".join(texts), "name")


def _as_step(step: Any) -> int:
    """A step in [0, MAX_STEP] from an int, a 0-d array or an integral float."""
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
        raise ValueError(f"step must be >= 0, got {value}")
    if value > MAX_STEP:
        raise ValueError(f"step must be < 2**63, got {value}")
    return value


def _check_counters(counters: Any) -> dict[str, int | float]:
    if not isinstance(counters, Mapping):
        raise ValueError(f"counters must be a dict, got {type(counters).__name__}")
    checked: dict[str, int | float] = {}
    for key, value in counters.items():
        _check_name(key, "counter name")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"counter {key!r} must be an int or float, got {type(value).__name__}")
        if isinstance(value, int) and abs(value) > MAX_STEP:
            raise ValueError(f"counter {key!r} is outside the int64 range: {value}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"counter {key!r} is not finite: {value}")
        checked[key] = value
    return checked


def _check_hyperparameters(hyperparameters: Any) -> dict[str, Any]:
    if not isinstance(hyperparameters, Mapping):
        raise ValueError(f"hyperparameters must be a dict, got {type(hyperparameters)}")
    for key, value in hyperparameters.items():
        if not isinstance(key, str):
            raise ValueError(f"hyperparameter names must be strings, got {key!r}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(
                f"hyperparameter {key!r} has a value of type {type(value).__name__}; "
                "only None, bool, int, float and str are portable (resolve schedules "
                "to a number or leave them out)"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"hyperparameter {key!r} is not finite: {value}")
    known = {k: v for k, v in hyperparameters.items() if k in DEFAULTS and v is not None}
    try:
        validate_hyperparameters(**known)
    except (TypeError, ValueError) as exc:  # a file's wrong type is a malformed file
        raise ValueError(str(exc)) from exc
    return dict(hyperparameters)


def _non_finite(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(np.isfinite(array)))


# -- save ---------------------------------------------------------------------


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
    bad = _non_finite(result)
    if bad:
        raise ValueError(f"{kind}[{index}] holds {bad} non-finite values (NaN/Inf); "
                         "portable state must be finite")
    return result


def _check_pairs(ms: Sequence[np.ndarray], hs: Sequence[np.ndarray]) -> None:
    if len(ms) != len(hs):
        raise ValueError(f"{len(ms)} momentum tensors but {len(hs)} Hessian tensors")
    for i, (m, h) in enumerate(zip(ms, hs, strict=True)):
        if m.shape != h.shape or m.dtype != h.dtype:
            raise ValueError(
                f"tensor {i}: m has shape {m.shape} and dtype {m.dtype} "
                f"but h has shape {h.shape} and dtype {h.dtype}"
            )


def save_state(
    path: str | os.PathLike[str],
    *,
    step: Any,
    ms: Sequence[Any],
    hs: Sequence[Any],
    hyperparameters: Mapping[str, Any],
    names: Sequence[str] | None = None,
    counters: Mapping[str, int | float] | None = None,
) -> None:
    """Write a portable state file (format version 2) to ``path`` (exactly that name; atomically).

    Args:
        path: the file to write.
        step: completed steps (int, 0-d array or integral float), below 2**63.
        ms: one momentum array per parameter (anything ``numpy.asarray``
            converts: numpy, CPU torch tensors, jax arrays, eager TF tensors),
            float16/32/64, finite.
        hs: the Hessian EMA, ``hs[i]`` with the shape and dtype of ``ms[i]``.
        hyperparameters: core names (validated) and host extras, each
            None/bool/int/float/str.
        names: the parameter name of each tensor (see the module docstring);
            default ``"0", "1", ...``.
        counters: name -> int or finite float (e.g. ``hessian_refreshes``).

    Raises:
        ValueError: naming the offending value; nothing is written then.
    """
    try:
        step = _as_step(step)
        ms = [_as_state_array("ms", i, m) for i, m in enumerate(ms)]
        hs = [_as_state_array("hs", i, h) for i, h in enumerate(hs)]
        _check_pairs(ms, hs)
        names = ([str(i) for i in range(len(ms))] if names is None
                 else _check_names(names, len(ms)))
        counters = _check_counters({} if counters is None else counters)
        hyperparameters = _check_hyperparameters(hyperparameters)
    except ValueError as exc:
        raise ValueError(f"save_state: {exc}") from exc
    header = json.dumps({"step": step, "names": names, "hyperparameters": hyperparameters,
                         "counters": counters}, allow_nan=False)
    if len(header) > MAX_HEADER_CHARS:
        raise ValueError(f"save_state: the header (names, hyperparameters, counters) has "
                         f"{len(header)} characters, more than {MAX_HEADER_CHARS}")
    arrays: dict[str, np.ndarray] = {
        "__format__": np.asarray(FORMAT),
        "__version__": np.asarray(VERSION, dtype=np.int64),
        "header": np.asarray(header),
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


# -- load: the archive, read member by member with every size checked first ---


class _Npy(NamedTuple):
    """A member's ``.npy`` header, read before its data."""

    stream: Any
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    #: Bytes the header describes, and the data bytes the zip entry declares.
    nbytes: int
    declared: int


class _Archive:
    """A zip archive whose directory has been checked; members are read on demand."""

    def __init__(self, zf: zipfile.ZipFile, file_size: int) -> None:
        self.zf = zf
        self.file_size = file_size
        infos = zf.infolist()
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if name in self.members:
                count = sum(i.filename == name for i in infos)
                raise _Malformed(f"duplicate member {name!r} (listed {count} times)")
            self.members[name] = info
        for info in infos:
            self._check_entry(info)

    def _check_entry(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if not name.endswith(".npy"):
            raise _Malformed(f"unexpected member {name!r} (an npz archive holds .npy members)")
        if info.flag_bits & 0x1:
            raise _Malformed(f"member {name!r} is encrypted")
        if info.compress_type not in _METHODS:
            raise _Malformed(
                f"member {name!r} uses compression method {info.compress_type}; only "
                "stored (0) and deflate (8), which numpy writes, are read")
        if info.compress_size > self.file_size:
            raise _Malformed(f"member {name!r} declares {info.compress_size} compressed bytes "
                             f"in a file of {self.file_size} bytes")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _Malformed(f"member {name!r} is stored but declares {info.file_size} bytes "
                             f"for {info.compress_size} stored bytes")
        if info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise _Malformed(f"member {name!r} declares {info.file_size} bytes from "
                             f"{info.compress_size} compressed bytes, more than deflate can "
                             "expand")

    def keys(self) -> set[str]:
        return {name[:-4] for name in self.members}

    def declared_bytes(self, keys: Iterable[str]) -> int:
        return sum(self.members[f"{key}.npy"].file_size for key in keys)

    def open(self, key: str, *, max_bytes: int) -> _Npy:
        """Open ``key`` and read its ``.npy`` header; its zip entry must fit ``max_bytes``."""
        info = self.members[f"{key}.npy"]
        prefix_limit = 12 + MAX_NPY_HEADER_BYTES
        if info.file_size > prefix_limit + max_bytes:
            raise _Malformed(f"entry {key!r} declares {info.file_size} bytes; its expected "
                             f"shape and dtype allow at most {prefix_limit + max_bytes}")
        try:
            stream = self.zf.open(info)
            magic = _read_exactly(stream, 8, key, "the .npy magic")
            if magic[:6] != b"\x93NUMPY" or magic[6:] not in (b"\x01\x00", b"\x02\x00"):
                raise _Malformed(f"entry {key!r} is not a version 1 or 2 .npy array "
                                 f"(starts with {magic!r})")
            size_format = "<H" if magic[6] == 1 else "<I"
            raw_length = _read_exactly(stream, struct.calcsize(size_format), key,
                                       "the .npy header length")
            (length,) = struct.unpack(size_format, raw_length)
            if length > MAX_NPY_HEADER_BYTES:
                raise _Malformed(f"entry {key!r} has a .npy header of {length} bytes "
                                 f"(at most {MAX_NPY_HEADER_BYTES})")
            text = _read_exactly(stream, length, key, "the .npy header")
            parse = (np.lib.format.read_array_header_1_0 if magic[6] == 1
                     else np.lib.format.read_array_header_2_0)
            buffer = io.BytesIO(magic + raw_length + text)
            np.lib.format.read_magic(buffer)
            shape, fortran_order, dtype = parse(buffer, max_header_size=MAX_NPY_HEADER_BYTES)
        except _Malformed:
            raise
        except Exception as exc:  # numpy's or zipfile's refusal of a malformed member
            raise _Malformed(f"entry {key!r}: unreadable .npy header "
                             f"({type(exc).__name__}: {exc})") from exc
        if any(n < 0 for n in shape) or len(shape) > 64 or dtype.itemsize == 0:
            stream.close()
            raise _Malformed(f"entry {key!r} declares an impossible array: shape {shape}, "
                             f"dtype {dtype}")
        header_bytes = 8 + len(raw_length) + length
        return _Npy(stream, tuple(shape), fortran_order, dtype,
                    math.prod(shape) * dtype.itemsize, info.file_size - header_bytes)

    def read(self, key: str, npy: _Npy) -> np.ndarray:
        """The data of an opened member whose shape and dtype the caller accepted.

        The zip entry's declared size must equal what the ``.npy`` header
        describes (checked here, before anything is allocated or decompressed).
        """
        if npy.nbytes != npy.declared:
            npy.stream.close()
            raise _Malformed(f"entry {key!r}: the zip entry declares {npy.declared} data bytes "
                             f"but its .npy header describes {npy.nbytes} (shape {npy.shape}, "
                             f"dtype {npy.dtype})")
        raw = np.empty(npy.nbytes, dtype=np.uint8)
        view = memoryview(raw)
        try:
            done = 0
            while done < npy.nbytes:
                chunk = npy.stream.read(min(_CHUNK, npy.nbytes - done))
                if not chunk:
                    raise _Malformed(f"entry {key!r} ends after {done} of {npy.nbytes} bytes")
                view[done:done + len(chunk)] = chunk
                done += len(chunk)
            npy.stream.read(1)  # reaching the end checks the CRC
        except _Malformed:
            raise
        except Exception as exc:  # CRC mismatch, corrupt deflate stream, truncated file
            raise _Malformed(f"entry {key!r} is damaged ({type(exc).__name__}: {exc})") from exc
        finally:
            npy.stream.close()
        flat = raw.view(npy.dtype)
        if not npy.dtype.isnative:
            flat = flat.astype(npy.dtype.newbyteorder("="))
        if npy.fortran_order:
            return flat.reshape(npy.shape[::-1]).transpose()
        return flat.reshape(npy.shape)

    def scalar(self, key: str, kind: str, *, max_itemsize: int = 8) -> Any:
        """A 0-d entry of dtype kind ``kind`` ('i' integer, 'U' text) as a Python value."""
        if f"{key}.npy" not in self.members:
            raise _Malformed(f"missing key {key!r} (not a portable state file?)")
        npy = self.open(key, max_bytes=max_itemsize)
        if npy.shape != () or npy.dtype.kind != kind:
            npy.stream.close()
            raise _Malformed(f"entry {key!r} must be a scalar of kind {kind!r}, "
                             f"got shape {npy.shape} and dtype {npy.dtype}")
        return self.read(key, npy).item()


def _read_exactly(stream: Any, size: int, key: str, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise _Malformed(f"entry {key!r} ends inside {what}")
    return data


def _parse_json(text: str, what: str, *, max_strings: int) -> Any:
    """``json.loads`` after bounding size, strings, containers and nesting (no recursion)."""
    if len(text) > MAX_HEADER_CHARS:
        raise _Malformed(f"{what} has {len(text)} characters (at most {MAX_HEADER_CHARS})")
    quotes = text.count('"')
    if quotes > 2 * max_strings:
        raise _Malformed(f"{what} holds {quotes} double quotes, more than {max_strings} JSON "
                         "strings (the archive's members and a few keys) can need")
    structure = _JSON_STRING.sub("", text)
    brackets = sum(structure.count(c) for c in "[]{}")
    containers = structure.count("[") + structure.count("{")
    if containers > MAX_JSON_CONTAINERS or brackets > 2 * MAX_JSON_CONTAINERS:
        raise _Malformed(f"{what} holds {containers} JSON arrays/objects "
                         f"(at most {MAX_JSON_CONTAINERS})")
    depth = deepest = 0
    for match in _JSON_BRACKETS.finditer(structure):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise _Malformed(f"{what} nests JSON {deepest} levels deep (at most {MAX_JSON_DEPTH})")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=constant)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an int of too many digits
        raise _Malformed(f"{what}: not valid JSON ({exc})") from exc


def _header_v1(archive: _Archive) -> tuple[int, list[str], dict, dict, int]:
    for key in _V1_KEYS:
        if f"{key}.npy" not in archive.members:
            raise _Malformed(f"missing key {key!r} (not a portable state file?)")
    step = archive.scalar("step", "i")
    count = archive.scalar("num_tensors", "i")
    if count < 0 or count > len(archive.members):
        raise _Malformed(f"num_tensors is {count} but the archive has only "
                         f"{len(archive.members)} members")
    text = archive.scalar("hyperparameters", "U", max_itemsize=4 * MAX_HEADER_CHARS)
    hyperparameters = _parse_json(text, "hyperparameters", max_strings=_EXTRA_STRINGS)
    return step, [str(i) for i in range(count)], hyperparameters, {}, count


def _header_v2(archive: _Archive) -> tuple[int, list[str], dict, dict, int]:
    for key in _V2_KEYS:
        if f"{key}.npy" not in archive.members:
            raise _Malformed(f"missing key {key!r} (not a portable state file?)")
    text = archive.scalar("header", "U", max_itemsize=4 * MAX_HEADER_CHARS)
    # One name per tensor, two members per tensor; keys and values besides.
    header = _parse_json(text, "header", max_strings=len(archive.members) + _EXTRA_STRINGS)
    if not isinstance(header, dict):
        raise _Malformed(f"header must be a JSON object, got {type(header).__name__}")
    missing = [k for k in _HEADER_FIELDS if k not in header]
    unexpected = sorted(k for k in header if k not in _HEADER_FIELDS)
    if missing or unexpected:
        raise _Malformed(f"header fields: missing {missing}, unexpected {unexpected}")
    step = header["step"]
    if isinstance(step, bool) or not isinstance(step, int):
        raise _Malformed(f"step must be an integer, got {step!r}")
    names = header["names"]
    if not isinstance(names, list):
        raise _Malformed(f"names must be a list, got {type(names).__name__}")
    count = len(names)
    if count > len(archive.members):
        raise _Malformed(f"the header names {count} tensors but the archive has only "
                         f"{len(archive.members)} members")
    try:
        names = _check_names(names, count)
    except ValueError as exc:
        raise _Malformed(str(exc)) from exc
    return step, names, header["hyperparameters"], header["counters"], count


def _expected_shape(shape: Any, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of ints, got {shape!r}") from None
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0
               for n in dims):
        raise ValueError(f"{what} must be a sequence of non-negative ints, got {shape!r}")
    return tuple(int(n) for n in dims)


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


def _plan(names: list[str], expect: Mapping[str, Any] | None,
          expect_shapes: Sequence[Any] | None) -> tuple[list[int], list[tuple | None], bool]:
    """File index, expected shape (or None) per result tensor, and whether by name."""
    count = len(names)
    if expect is not None:
        if not isinstance(expect, Mapping):
            raise ValueError(f"expect must be a mapping name -> shape, got {type(expect)}")
        where = {name: i for i, name in enumerate(names)}
        missing = [n for n in expect if n not in where]
        unexpected = [n for n in names if n not in expect]
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing from the file: {_listing(missing)}")
            if unexpected:
                problems.append(f"in the file but not expected: {_listing(unexpected)}")
            raise _Malformed(f"parameter names do not match ({'; '.join(problems)})")
        shapes = [_expected_shape(s, f"expect[{n!r}]") for n, s in expect.items()]
        return [where[n] for n in expect], shapes, True
    if expect_shapes is not None:
        shapes = [_expected_shape(s, f"expect_shapes[{i}]") for i, s in enumerate(expect_shapes)]
        if len(shapes) != count:
            raise _Malformed(f"the file holds state for {count} tensors, expected {len(shapes)}")
        return list(range(count)), shapes, False
    return list(range(count)), [None] * count, False


def load_state(
    path: str | os.PathLike[str],
    *,
    expect: Mapping[str, Sequence[int]] | None = None,
    expect_shapes: Sequence[Sequence[int]] | None = None,
    expect_dtypes: Sequence[Any] | None = None,
) -> PortableState:
    """Read a portable state file (format version 1 or 2); nothing is unpickled.

    Args:
        path: the file.
        expect: ordered mapping parameter name -> shape, in the importer's
            order: tensors are matched by name and the result (``names``,
            ``ms``, ``hs``) follows this order.
        expect_shapes: one shape per tensor, matched by position (file
            order; version 1 behaviour). Give ``expect`` or this, not both.
        expect_dtypes: one state dtype per tensor, in the result's order.

    Returns:
        A :class:`PortableState`.

    Raises:
        ValueError: naming the problem: a missing or unexpected entry or
            name, the tensor whose shape/dtype differs from the expectation,
            a size or limit exceeded, an unsupported version or compression,
            non-finite state, a damaged archive.
    """
    where = f"load_state({os.fspath(path)!r})"
    if expect is not None and expect_shapes is not None:
        raise ValueError(f"{where}: give expect= (by name) or expect_shapes= (by position), "
                         "not both")
    try:
        with open(path, "rb") as f:
            return _load(f, expect=expect, expect_shapes=expect_shapes,
                         expect_dtypes=expect_dtypes)
    except _Malformed as exc:
        raise ValueError(f"{where}: {exc}") from exc.__cause__
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the file ({exc})") from exc


def _load(f: Any, *, expect: Mapping[str, Any] | None, expect_shapes: Sequence[Any] | None,
          expect_dtypes: Sequence[Any] | None) -> PortableState:
    file_size = os.fstat(f.fileno()).st_size
    if f.read(6) == b"\x93NUMPY":
        raise _Malformed("a plain .npy array, not an npz archive")
    f.seek(0)
    try:
        zf = zipfile.ZipFile(f)
    except Exception as exc:  # BadZipFile, EOFError, struct/overflow errors of a bad directory
        raise _Malformed(f"not a readable npz (zip) archive ({type(exc).__name__}: {exc})"
                         ) from exc
    with zf:
        archive = _Archive(zf, file_size)
        fmt = archive.scalar("__format__", "U", max_itemsize=4 * len(FORMAT) + 64)
        if fmt != FORMAT:
            raise _Malformed(f"__format__ is {fmt!r}, expected {FORMAT!r}")
        version = archive.scalar("__version__", "i")
        if version not in READ_VERSIONS:
            raise _Malformed(f"format version {version} is not supported (this reader reads "
                             f"versions {', '.join(map(str, READ_VERSIONS))})")
        step, names, hyperparameters, counters, count = (
            _header_v1 if version == 1 else _header_v2)(archive)
        if step < 0:
            raise _Malformed(f"step must be >= 0, got {step}")
        if step > MAX_STEP:
            raise _Malformed(f"step must be < 2**63, got {step}")
        try:
            hyperparameters = _check_hyperparameters(hyperparameters)
            counters = _check_counters(counters)
        except _Malformed:
            raise
        except ValueError as exc:
            raise _Malformed(str(exc)) from exc
        header_keys = set(_V1_KEYS if version == 1 else _V2_KEYS)
        tensor_keys = {f"{kind}/{i}" for kind in "mh" for i in range(count)}
        present = archive.keys()
        for key in sorted(tensor_keys - present):
            raise _Malformed(f"missing key {key!r} ({count} tensors)")
        unexpected = sorted(present - tensor_keys - header_keys)
        if unexpected:
            raise _Malformed(f"unexpected keys {unexpected}")
        order, shapes, by_name = _plan(names, expect, expect_shapes)
        dtypes: list[np.dtype | None] = [None] * len(order)
        if expect_dtypes is not None:
            dtypes = [np.dtype(d) for d in expect_dtypes]
            if len(dtypes) != len(order):
                raise _Malformed(f"the file holds state for {len(order)} tensors, "
                                 f"expected {len(dtypes)} dtypes")
        if shapes and shapes[0] is None:
            declared = archive.declared_bytes(tensor_keys)
            if declared > MAX_EXPANSION * file_size:
                raise _Malformed(
                    f"the tensors declare {declared} bytes in a file of {file_size} bytes (at "
                    f"most {MAX_EXPANSION}x without expected shapes; pass expect= or "
                    "expect_shapes= to load a compressed file)")
        ms, hs = [], []
        for position, (index, shape, dtype) in enumerate(zip(order, shapes, dtypes,
                                                             strict=True)):
            label = f"tensor {names[index]!r}" if by_name else (
                f"tensor {position}" if names[index] == str(position)
                else f"tensor {position} ({names[index]!r})")
            m, h = _read_pair(archive, index, label, shape, dtype, file_size)
            ms.append(m)
            hs.append(h)
    return PortableState(step=int(step), ms=ms, hs=hs, hyperparameters=hyperparameters,
                         names=[names[i] for i in order], counters=counters, version=version)


def _read_pair(archive: _Archive, index: int, label: str, shape: tuple | None,
               dtype: np.dtype | None, file_size: int) -> tuple[np.ndarray, np.ndarray]:
    itemsize = max(d.itemsize for d in STATE_DTYPES)
    limit = (math.prod(shape) * itemsize if shape is not None
             else MAX_EXPANSION * file_size)
    arrays = []
    first: _Npy | None = None
    for kind in "mh":
        npy = archive.open(f"{kind}/{index}", max_bytes=limit)
        try:
            native = npy.dtype.newbyteorder("=") if npy.dtype.kind in "fiuc" else npy.dtype
            if native not in STATE_DTYPES:
                extra = ("; object arrays need pickle, which this reader never uses"
                         if npy.dtype.hasobject else "")
                raise _Malformed(f"{label}: {kind} has unsupported dtype {npy.dtype}{extra}")
            if first is not None and (npy.shape != first.shape or native != first.dtype):
                raise _Malformed(
                    f"{label}: m has shape {first.shape} and dtype {first.dtype} "
                    f"but h has shape {npy.shape} and dtype {native}")
            if first is None:
                if shape is not None and npy.shape != shape:
                    raise _Malformed(f"{label}: expected shape {shape}, got {npy.shape}")
                if dtype is not None and native != dtype:
                    raise _Malformed(f"{label}: expected dtype {dtype}, got {native}")
                first = npy._replace(dtype=native)
        except _Malformed:
            npy.stream.close()
            raise
        array = archive.read(f"{kind}/{index}", npy)
        bad = _non_finite(array)
        if bad:
            raise _Malformed(f"{label}: {kind} holds {bad} non-finite values (NaN/Inf); "
                             "portable state must be finite")
        arrays.append(array)
    return arrays[0], arrays[1]
