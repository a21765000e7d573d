"""Finding the array namespace, the compute dtype, and array-metadata checks.

Everything here looks at metadata only (dtype, shape), never at values, so it
is safe under ``jax.jit``, ``torch.compile`` and ``tf.function``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LARGEST",
    "NAMESPACE_FUNCTIONS",
    "check_eps",
    "check_floating",
    "check_same_shape",
    "compute_dtype",
    "dtype_name",
    "namespace_of",
]

#: Every attribute of ``xp`` that ``sophia_core`` uses. A namespace shim (the
#: TensorFlow adapter's) must provide exactly these; a test keeps this tuple
#: equal to what the core's source actually calls.
NAMESPACE_FUNCTIONS: tuple[str, ...] = (
    "abs",
    "arange",
    "argmax",
    "astype",
    "ceil",
    "clip",
    "concat",
    "exp",
    "float32",
    "float64",
    "int32",
    "isdtype",
    "isfinite",
    "log",
    "max",
    "ones_like",
    "reshape",
    "sort",
    "sum",
    "where",
    "zeros_like",
)


def namespace_of(*arrays: Any, xp: Any = None) -> Any:
    """``xp`` if given, else the array-API namespace of ``arrays``."""
    if xp is not None:
        return xp
    from array_api_compat import array_namespace

    return array_namespace(*arrays)


def check_floating(name: str, array: Any, *, xp: Any) -> None:
    """Raise TypeError unless ``array`` has a real floating dtype."""
    if not xp.isdtype(array.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype, got {array.dtype}"
        )


def check_same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raise ValueError naming both shapes unless they are equal."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} "
            f"but {name_b} has shape {tuple(b.shape)}"
        )


def compute_dtype(dtype: Any, *, xp: Any) -> Any:
    """The dtype arithmetic and state use for parameters of ``dtype``.

    float32 and float64 compute in themselves; narrower floating dtypes
    (float16, bfloat16) compute in float32 (SPEC section 1).
    """
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


#: Smallest positive normal numbers of the compute dtypes (IEEE 754).
_SMALLEST_NORMAL = {"float32": 2.0**-126, "float64": 2.0**-1022}
#: Largest finite numbers of the compute dtypes (IEEE 754).
LARGEST = {
    "float32": float.fromhex("0x1.fffffep127"),
    "float64": float.fromhex("0x1.fffffffffffffp1023"),
}


def dtype_name(dtype: Any, *, xp: Any) -> str:
    """``"float64"`` or ``"float32"``: the compute dtype's name."""
    return "float64" if compute_dtype(dtype, xp=xp) == xp.float64 else "float32"


def check_eps(eps: Any, dtype: Any, *, xp: Any, gamma: Any = None) -> None:
    """Raise ValueError unless ``eps`` (and ``gamma``) suit parameters of ``dtype``.

    ``max(gamma*h, eps)`` must stay positive and finite: an eps that
    underflows in the compute dtype would allow ``0 / 0``, and a gamma that
    overflows it would give ``inf * 0``. Call it wherever the parameter dtypes
    become known (the update calls it too). Values that are not Python
    numbers (traced, injected) are the host's to check.
    """
    name = dtype_name(dtype, xp=xp)
    if isinstance(eps, (int, float)) and eps < _SMALLEST_NORMAL[name]:
        raise ValueError(
            f"eps (epsilon) must be a normal {name} number (>= {_SMALLEST_NORMAL[name]:.3g}) "
            f"for these parameters, got {eps!r}"
        )
    if isinstance(gamma, (int, float)) and gamma > LARGEST[name]:
        raise ValueError(
            f"gamma (rho) must be a finite {name} number (<= {LARGEST[name]:.4g}) "
            f"for these parameters, got {gamma!r}"
        )
