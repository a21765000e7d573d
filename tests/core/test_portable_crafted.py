"""Crafted state files: every one is refused with a ValueError, quickly and in little memory.

The zip archives are written byte by byte here (``_zip``), so a file can lie
in every field the reader trusts: member count, compression method,
declared sizes, ``.npy`` headers, JSON. Each load runs under tracemalloc
(numpy reports its array buffers to it) and a CPU-time clock, and must stay
under :data:`MEMORY_BOUND` and :data:`CPU_BOUND`. These are resource bounds,
not speed measurements: the attacks they stop cost gigabytes and minutes on
the version-1 reader (issue 15), the refusals cost kilobytes and milliseconds.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import struct
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from sophia_core import portable

#: Peak traced memory of one load of a bad file.
MEMORY_BOUND = 100 * 2**20
#: CPU time of one load of a bad file (the refusals take milliseconds).
CPU_BOUND = 1.0


# -- writing archives byte by byte ------------------------------------------------


@dataclasses.dataclass
class Member:
    """One zip member; every field the reader sees can be set independently."""

    name: str
    data: bytes = b""
    method: int = zipfile.ZIP_STORED
    #: The bytes written (default: ``data``, deflated when ``method`` is deflate).
    compressed: bytes | None = None
    #: Declared uncompressed size and CRC (default: those of ``data``).
    file_size: int | None = None
    crc: int | None = None
    flags: int = 0


def _zip(members: list[Member]) -> bytes:
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        payload = m.compressed
        if payload is None:
            if m.method == zipfile.ZIP_DEFLATED:
                packer = zlib.compressobj(9, zlib.DEFLATED, -15)
                payload = packer.compress(m.data) + packer.flush()
            else:
                payload = m.data
        size = len(m.data) if m.file_size is None else m.file_size
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        fields = (m.flags, m.method, 0, 0x21, crc, len(payload), size, len(name))
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, *fields, 0) + name + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, *fields,
                               0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                      len(central), len(out), 0)
    return bytes(out + central + end)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(descr: str, shape: tuple[int, ...], *, version: tuple[int, int] = (1, 0)
                ) -> bytes:
    buffer = io.BytesIO()
    write = (np.lib.format.write_array_header_1_0 if version == (1, 0)
             else np.lib.format.write_array_header_2_0)
    write(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _tensors(count: int = 1, **overrides: np.ndarray | bytes) -> dict[str, bytes]:
    tensors: dict[str, np.ndarray | bytes] = {}
    for i in range(count):
        tensors[f"m/{i}"] = np.zeros(2, np.float32)
        tensors[f"h/{i}"] = np.ones(2, np.float32)
    tensors.update(overrides)
    return {k: v if isinstance(v, bytes) else _npy(v) for k, v in tensors.items()}


def v1_members(*, num_tensors: int = 1, step: np.ndarray | None = None,
               hyperparameters: str = "{}", **tensors: np.ndarray | bytes) -> list[Member]:
    """A version-1 file (the layout of the old writer), with overrides."""
    entries = {
        "__format__": _npy(np.asarray(portable.FORMAT)),
        "__version__": _npy(np.asarray(1, np.int64)),
        "step": _npy(np.asarray(3, np.int64) if step is None else step),
        "num_tensors": _npy(np.asarray(num_tensors, np.int64)),
        "hyperparameters": _npy(np.asarray(hyperparameters)),
        **_tensors(1, **{k.replace("_", "/"): v for k, v in tensors.items()}),
    }
    return [Member(f"{k}.npy", v) for k, v in entries.items()]


def v2_header(**fields: object) -> str:
    header = {"step": 3, "names": ["0"], "hyperparameters": {}, "counters": {}}
    header.update(fields)
    return json.dumps(header)


def v2_members(header: str | None = None, count: int = 1, **tensors: np.ndarray | bytes
               ) -> list[Member]:
    entries = {
        "__format__": _npy(np.asarray(portable.FORMAT)),
        "__version__": _npy(np.asarray(2, np.int64)),
        "header": _npy(np.asarray(v2_header() if header is None else header)),
        **_tensors(count, **{k.replace("_", "/"): v for k, v in tensors.items()}),
    }
    return [Member(f"{k}.npy", v) for k, v in entries.items()]


def _with(members: list[Member], name: str, **changes: object) -> list[Member]:
    return [dataclasses.replace(m, **changes) if m.name == name else m for m in members]


# -- the zero bomb: ~2 MB of deflate that claims 2 GiB of zeros ----------------------


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, column) for column in matrix]


def crc32_zero_extend(crc: int, n: int) -> int:
    """``zlib.crc32(data + bytes(n))`` from ``crc = zlib.crc32(data)`` in O(log n) (zlib's
    ``crc32_combine``), so the bomb carries a correct CRC without hashing 2 GiB."""
    odd = [0xEDB88320] + [1 << k for k in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    register = crc ^ 0xFFFFFFFF
    while n:
        even = _gf2_square(odd)
        if n & 1:
            register = _gf2_times(even, register)
        n >>= 1
        if not n:
            break
        odd = _gf2_square(even)
        if n & 1:
            register = _gf2_times(odd, register)
        n >>= 1
    return register ^ 0xFFFFFFFF


def test_crc32_zero_extend_matches_zlib():
    for data in (b"", b"abc", _npy_header("<f4", (5,))):
        for n in (0, 1, 7, 1000, 65537):
            assert crc32_zero_extend(zlib.crc32(data), n) == zlib.crc32(data + bytes(n))


BOMB_BYTES = 2**31  # 2 GiB of float32 zeros


@pytest.fixture(scope="module")
def zero_bomb() -> Member:
    return _zero_bomb()


def _zero_bomb() -> Member:
    """``m/0.npy``: deflate of a .npy header and 2 GiB of zeros, about 2 MB."""
    header = _npy_header("<f4", (BOMB_BYTES // 4,))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    mebibyte = bytes(2**20)
    block = packer.compress(mebibyte) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(mebibyte) + packer.flush(zlib.Z_FULL_FLUSH)
    assert again == block  # after a full flush every MiB of zeros compresses the same
    stream = start + block * (BOMB_BYTES // 2**20 - 1) + again + packer.flush()
    check = zlib.decompressobj(-15)
    assert check.decompress(stream[:65536], len(header)) == header
    return Member("m/0.npy", method=zipfile.ZIP_DEFLATED, compressed=stream,
                  file_size=len(header) + BOMB_BYTES,
                  crc=crc32_zero_extend(zlib.crc32(header), BOMB_BYTES))


# -- loading under the bounds ---------------------------------------------------------


def load_refused(path, match: str, **kwargs: object) -> ValueError:
    """Load ``path``; it must raise ValueError matching ``match`` within the bounds."""
    gc.collect()
    tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(ValueError, match=match) as info:
            portable.load_state(path, **kwargs)
    finally:
        seconds = time.process_time() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert seconds < CPU_BOUND, f"{seconds:.2f} s of CPU time"
    assert str(info.value).startswith("load_state("), str(info.value)
    return info.value


def _write(tmp_path, members: list[Member]):
    path = tmp_path / "crafted.npz"
    path.write_bytes(_zip(members))
    return path


def test_the_zip_writer_writes_what_the_reader_accepts(tmp_path):
    for members in (v1_members(), v2_members()):
        state = portable.load_state(_write(tmp_path, members), expect_shapes=[(2,)])
        assert state.step == 3 and state.names == ["0"]
        assert state.hs[0].tolist() == [1.0, 1.0]


# -- the measured attacks of issue 15 -------------------------------------------------


def test_num_tensors_of_a_billion_in_3_kb(tmp_path):
    path = _write(tmp_path, v1_members(num_tensors=10**9))
    assert path.stat().st_size < 3000
    load_refused(path, "num_tensors is 1000000000 but the archive has only 7 members")


@pytest.mark.parametrize("expect", [None, [(2,)]], ids=["no expectation", "expect_shapes"])
def test_2_mb_of_deflate_claiming_2_gib(tmp_path, zero_bomb, expect):
    members = [zero_bomb if m.name == "m/0.npy" else m for m in v1_members()]
    path = _write(tmp_path, members)
    assert path.stat().st_size < 3 * 2**20
    match = (f"entry 'm/0' declares {zero_bomb.file_size} bytes" if expect
             else r"the tensors declare 2147483\d{3} bytes in a file of \d{7} bytes")
    load_refused(path, match, expect_shapes=expect)


def test_2_gib_bomb_refused_by_name_too(tmp_path, zero_bomb):
    members = [zero_bomb if m.name == "m/0.npy" else m for m in v2_members()]
    load_refused(_write(tmp_path, members), f"entry 'm/0' declares {zero_bomb.file_size} bytes",
                 expect={"0": (2,)})


@pytest.mark.parametrize("expect", [None, [(2,)]], ids=["no expectation", "expect_shapes"])
def test_7_tib_element_claim(tmp_path, expect):
    claim = _npy_header("<f4", (7 * 2**40 // 4,)) + bytes(8)
    path = _write(tmp_path, v1_members(m_0=claim))
    match = (r"expected shape \(2,\), got \(1924145348608,\)" if expect
             else "zip entry declares 8 data bytes but its .npy header describes 7696581394432")
    load_refused(path, match, expect_shapes=expect)


@pytest.mark.parametrize("depth", [100_000, portable.MAX_JSON_DEPTH + 1])
def test_deep_json(tmp_path, depth):
    text = "[" * depth + "]" * depth
    path = _write(tmp_path, v1_members(hyperparameters=text))
    match = "JSON arrays/objects" if depth > portable.MAX_JSON_CONTAINERS else "nests JSON 9"
    load_refused(path, match)


def test_deep_json_in_a_v2_header(tmp_path):
    nested = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}
    path = _write(tmp_path, v2_members(v2_header(hyperparameters=nested)))
    load_refused(path, "header nests JSON 9 levels deep")


@pytest.mark.parametrize(
    ("method", "label"),
    [(99, "unknown"), (zipfile.ZIP_LZMA, "lzma"), (zipfile.ZIP_BZIP2, "bzip2")],
)
def test_compression_other_than_stored_and_deflate(tmp_path, method, label):
    path = _write(tmp_path, _with(v1_members(), "m/0.npy", method=method))
    load_refused(path, f"member 'm/0.npy' uses compression method {method}; only stored")


def test_encrypted_member(tmp_path):
    path = _write(tmp_path, _with(v1_members(), "h/0.npy", flags=0x1))
    load_refused(path, "member 'h/0.npy' is encrypted")


@pytest.mark.parametrize("step", [2**63, 2**64 + 5, -1])
def test_step_outside_int64_in_a_v2_header(tmp_path, step):
    path = _write(tmp_path, v2_members(v2_header(step=step)))
    load_refused(path, "step must be < 2\\*\\*63" if step > 0 else "step must be >= 0")


def test_step_as_uint64_in_a_v1_file(tmp_path):
    path = _write(tmp_path, v1_members(step=np.asarray(2**63, np.uint64)))
    load_refused(path, "entry 'step' must be a scalar of kind 'i'")


@pytest.mark.parametrize(
    ("kind", "value"), [("m", np.nan), ("h", np.inf), ("h", -np.inf), ("m", np.inf)])
def test_non_finite_state(tmp_path, kind, value):
    array = np.asarray([1.0, value], np.float32)
    path = _write(tmp_path, v1_members(**{f"{kind}_0": array}))
    load_refused(path, f"tensor 0: {kind} holds 1 non-finite values")


def test_duplicate_members(tmp_path):
    members = v1_members()
    decoy = Member("m/0.npy", _npy(np.full(2, 7.0, np.float32)))
    load_refused(_write(tmp_path, [*members, decoy]), "duplicate member 'm/0.npy' .listed 2")


def test_a_member_without_the_npy_suffix_is_not_an_alias(tmp_path):
    members = [*v1_members(), Member("m/0", _npy(np.full(2, 7.0, np.float32)))]
    load_refused(_write(tmp_path, members), "unexpected member 'm/0'")


# -- sizes, headers and names beyond the measured attacks ------------------------------


def test_stored_member_larger_than_the_file(tmp_path):
    members = _with(v1_members(), "m/0.npy", file_size=3 * 2**30, compressed=b"x" * 10)
    # stored: the declared size must equal the stored size ...
    load_refused(_write(tmp_path, members), "is stored but declares 3221225472 bytes")
    huge = _with(v1_members(), "m/0.npy", file_size=3 * 2**30, compressed=b"x" * 10,
                 method=zipfile.ZIP_DEFLATED)
    # ... and deflate cannot make 3 GiB out of 10 bytes.
    load_refused(_write(tmp_path, huge), "more than deflate can expand")


def test_npy_header_length_of_4_gib(tmp_path):
    payload = b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b" " * 64
    load_refused(_write(tmp_path, v1_members(m_0=payload)), "has a .npy header of 4294967295")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"PK\x03\x04 not an array", "is not a version 1 or 2 .npy array"),
        (b"\x93NUMPY\x03\x00" + bytes(8), "is not a version 1 or 2 .npy array"),
        (_npy_header("<f4", (2,))[:-20], "ends inside the .npy header"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': [[[[[[", "unreadable .npy header"),
        (_npy_header("<f4", (-2, 4)), "declares an impossible array"),
        (_npy_header("<V0", (3,)), "declares an impossible array"),
        (_npy_header("|O", (2,)) + bytes(16), "object arrays need pickle"),
        (_npy_header("<i8", (2,)) + bytes(16), "unsupported dtype int64"),
    ],
)
def test_malformed_npy_headers(tmp_path, payload, match):
    load_refused(_write(tmp_path, v1_members(m_0=payload)), match)


def test_header_text_longer_than_the_limit(tmp_path):
    text = v2_header() + " " * portable.MAX_HEADER_CHARS  # valid JSON, too long
    load_refused(_write(tmp_path, v2_members(text)), "header has 2097[0-9]* characters")


def test_header_dtype_claiming_a_gigabyte(tmp_path):
    claim = _npy_header("<U250000000", ()) + bytes(40)
    members = [m if m.name != "header.npy" else Member("header.npy", claim)
               for m in v2_members()]
    load_refused(_write(tmp_path, members), "entry 'header': the zip entry declares 40")


def test_header_of_400_000_names(tmp_path):
    """Within the size limit, but more strings than the archive's members can use."""
    names = [str(i % 10) for i in range((portable.MAX_HEADER_CHARS - 200) // 5)]
    text = v2_header(names=names)
    assert len(text) <= portable.MAX_HEADER_CHARS
    quotes = 2 * len(names) + 8  # and the keys step, names, hyperparameters, counters
    load_refused(_write(tmp_path, v2_members(text)), f"header holds {quotes} double quotes")


def test_ten_thousand_members(tmp_path):
    """The zip directory itself costs memory in proportion to the file size only."""
    members = v1_members(num_tensors=5000)
    empty = _npy(np.zeros(0, np.float32))
    members += [Member(f"{k}/{i}.npy", empty) for i in range(1, 5000) for k in "mh"]
    members += [Member("x.npy", empty)]
    load_refused(_write(tmp_path, members), r"unexpected keys \['x'\]")


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["0", "0"], r"names\[1\] repeats names\[0\] \('0'\)"),
        (["0", ""], r"names\[1\] is empty"),
        (["0", "a\nb"], r"names\[1\] 'a\\nb' contains a non-printable character"),
        (["0", "x" * 1025], r"names\[1\] has 1025 characters"),
        (["0", 1], r"names\[1\] must be a str"),
        ("01", "names must be a list"),
        (["0"], r"unexpected keys \['h/1', 'm/1'\]"),
        ([str(i) for i in range(10)], "the header names 10 tensors but the archive has only 7"),
    ],
)
def test_bad_names(tmp_path, names, match):
    path = _write(tmp_path, v2_members(v2_header(names=names), count=2))
    load_refused(path, match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"counters": {"gamma": "0.04"}}, "counter 'gamma' must be an int or float"),
        ({"counters": {"hessian_refreshes": True}}, "must be an int or float, got bool"),
        ({"counters": {"rejected": 2**63}}, "outside the int64 range"),
        ({"counters": []}, "counters must be a dict"),
        ({"hyperparameters": {"b2": 1.0}}, r"b2 \(betas\[1\], beta_2\) must be"),
        ({"hyperparameters": {"schedule": [1, 2]}}, "'schedule' has a value of type list"),
        # The core validator's TypeError (wrong type) is a malformed file here.
        ({"hyperparameters": {"lr": "1e-3"}}, r"lr \(learning_rate\) must be a real number"),
        ({"hyperparameters": {"maximize": 1}}, "maximize must be a bool"),
        ({"step": 3.0}, "step must be an integer, got 3.0"),
        ({"step": True}, "step must be an integer, got True"),
        ({"extra": 1}, r"header fields: missing \[\], unexpected \['extra'\]"),
        ({"names": None}, "names must be a list, got NoneType"),
    ],
)
def test_bad_header_fields(tmp_path, fields, match):
    load_refused(_write(tmp_path, v2_members(v2_header(**fields))), match)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"step": NaN}', "NaN is not a JSON number"),
        ('{"step": 3', "not valid JSON"),
        ('{"step": ' + "9" * 5000 + "}", "not valid JSON"),
        ("[]", "header must be a JSON object, got list"),
        ('"' + "\\" * 1000, "not valid JSON"),
        (v2_header(counters={"gamma": 0.5}).replace("0.5", "1e400"),
         "counter 'gamma' is not finite"),
    ],
)
def test_bad_header_json(tmp_path, text, match):
    load_refused(_write(tmp_path, v2_members(text)), match)


# -- the figures on docs/portable-state.md: python tests/core/test_portable_crafted.py ----


def _measured_attacks() -> list[tuple[str, list[Member], dict]]:
    bomb = _zero_bomb()
    seven_tib = _npy_header("<f4", (7 * 2**40 // 4,)) + bytes(8)
    return [
        ("num_tensors 10**9", v1_members(num_tensors=10**9), {}),
        ("2 GiB of deflated zeros", [bomb if m.name == "m/0.npy" else m
                                     for m in v1_members()], {"expect_shapes": [(2,)]}),
        ("  same, no expectation", [bomb if m.name == "m/0.npy" else m
                                    for m in v1_members()], {}),
        ("7 TiB element claim", v1_members(m_0=seven_tib), {"expect_shapes": [(2,)]}),
        ("JSON nested 100,000 deep", v1_members(hyperparameters="[" * 100_000 + "]" * 100_000),
         {}),
        ("compression method 99", _with(v1_members(), "m/0.npy", method=99), {}),
        ("step 2**63", v2_members(v2_header(step=2**63)), {}),
        ("NaN in m", v1_members(m_0=np.asarray([1.0, np.nan], np.float32)), {}),
        ("duplicate member", [*v1_members(), Member("m/0.npy", _npy(np.ones(2, np.float32)))],
         {}),
        ("header of 400,000 names", v2_members(v2_header(
            names=[str(i % 10) for i in range((portable.MAX_HEADER_CHARS - 200) // 5)])), {}),
    ]


def main() -> None:
    import pathlib
    import tempfile

    print(f"{'attack':<26} {'file':>10} {'peak traced':>12} {'CPU':>8}  refusal")
    with tempfile.TemporaryDirectory() as tmp:
        for label, members, kwargs in _measured_attacks():
            path = pathlib.Path(tmp) / "crafted.npz"
            path.write_bytes(_zip(members))
            gc.collect()
            tracemalloc.start()
            start = time.process_time()
            try:
                portable.load_state(path, **kwargs)
                message = "LOADED"
            except ValueError as exc:
                message = str(exc).split("): ", 1)[-1]
            seconds = time.process_time() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            size = path.stat().st_size
            print(f"{label:<26} {size / 1024:>7.0f} KB {peak / 2**20:>8.2f} MiB "
                  f"{seconds * 1000:>5.1f} ms  {message[:60]}")


if __name__ == "__main__":
    main()
