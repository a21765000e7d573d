"""What Keras does not abstract: gradients, Hessian-vector products, host calls.

Keras 3 has no backend-neutral autodiff, so each backend supplies two small
functions over *values* (tensors, not variables), the form JAX needs and the
other two accept:

- ``grad_and_aux(fn, values)``: the gradient of ``fn(values) -> (scalar, aux)``
  with respect to ``values``, and ``aux``;
- ``hvp(fn, values, tangents)``: the Hessian of the scalar ``fn(values)``
  times ``tangents``.

``traced(x)``: whether ``x`` is a symbolic value of compiled code (no
Python branch on it).

Gradients come back dense and with the values' static shapes (TensorFlow
gives embeddings ``IndexedSlices`` of unknown shape). ``host_call_if(flag,
function, *args)`` runs ``function(*args)`` when a (possibly traced) bool is true,
from compiled code where the backend allows it; it returns False where it
cannot: inside a TensorFlow XLA cluster, which has no host operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

__all__ = ["dense", "grad_and_aux", "host_call_if", "hvp", "traced"]


def dense(gradient: Any, like: Any) -> Any:
    """``gradient`` as a dense tensor of ``like``'s shape (sparse ones densified).

    ``convert_to_tensor(sparse=False)`` densifies JAX's BCOO; the reshape
    densifies TensorFlow's ``IndexedSlices`` and restores the static shape a
    distribution strategy loses.
    """
    return ops.reshape(ops.convert_to_tensor(gradient, sparse=False), tuple(like.shape))


def _tensorflow():
    import tensorflow as tf

    zero = tf.UnconnectedGradients.ZERO

    def grad_and_aux(fn, values):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(values)
            loss, aux = fn(values)
        grads = tape.gradient(loss, values, unconnected_gradients=zero)
        return [dense(g, v) for g, v in zip(grads, values, strict=True)], aux

    def hvp(fn, values, tangents):
        # Forward over reverse; the gradients are densified inside the
        # accumulator, since it cannot push tangents through IndexedSlices.
        with tf.autodiff.ForwardAccumulator(values, tangents) as accumulator:
            grads, _ = grad_and_aux(lambda v: (fn(v), ()), values)
        return accumulator.jvp(grads, unconnected_gradients=zero)

    def host_call_if(flag, function, *args):
        if tf.executing_eagerly():
            if bool(flag):
                function(*args)
            return True
        if tf.__internal__.get_enclosing_xla_context() is not None:
            return False

        def call():
            tf.py_function(function, list(args), [])
            return tf.constant(True)

        tf.cond(flag, call, lambda: tf.constant(False))
        return True

    def traced(x):
        return not tf.executing_eagerly()

    return grad_and_aux, hvp, host_call_if, traced


def _jax():
    import jax

    def grad_and_aux(fn, values):
        return jax.grad(fn, has_aux=True)(list(values))

    def hvp(fn, values, tangents):
        return jax.jvp(jax.grad(fn), (list(values),), (list(tangents),))[1]

    def traced(x):
        return isinstance(x, jax.core.Tracer)

    def host_call_if(flag, function, *args):
        if not traced(flag):
            if bool(flag):
                function(*args)
        else:
            jax.lax.cond(flag, lambda: jax.debug.callback(function, *args), lambda: None)
        return True

    return grad_and_aux, hvp, host_call_if, traced


def _torch():
    import torch

    def leaves(values):
        return [torch.as_tensor(v).detach().requires_grad_(True) for v in values]

    def full(grads, values):
        return [torch.zeros_like(v) if g is None else dense(g, v)
                for g, v in zip(grads, values, strict=True)]

    def grad_and_aux(fn, values):
        values = leaves(values)
        with torch.enable_grad():
            loss, aux = fn(values)
            grads = torch.autograd.grad(loss, values, allow_unused=True)
        return full(grads, values), aux

    def hvp(fn, values, tangents):
        values = leaves(values)
        with torch.enable_grad():
            grads = torch.autograd.grad(fn(values), values, create_graph=True,
                                        allow_unused=True)
            # Only gradients that depend on the values enter the second pass.
            pairs = [(g, t) for g, t in zip(grads, tangents, strict=True)
                     if g is not None and g.requires_grad]
            products = torch.autograd.grad(
                [g for g, _ in pairs], values, grad_outputs=[t for _, t in pairs],
                allow_unused=True) if pairs else [None] * len(values)
        return full(products, values)

    def host_call_if(flag, function, *args):
        if bool(flag):
            function(*args)
        return True

    def traced(x):
        return False  # Keras on torch runs eagerly (torch.compile traces Python)

    return grad_and_aux, hvp, host_call_if, traced


_BACKENDS: dict[str, Callable[[], tuple[Callable, ...]]] = {
    "tensorflow": _tensorflow, "jax": _jax, "torch": _torch,
}
if keras.backend.backend() not in _BACKENDS:
    raise ImportError(
        f"sophia_tf supports the Keras backends {sorted(_BACKENDS)}, "
        f"not {keras.backend.backend()!r}"
    )
grad_and_aux: Callable[[Callable, Sequence[Any]], tuple[list[Any], Any]]
hvp: Callable[[Callable, Sequence[Any], Sequence[Any]], list[Any]]
host_call_if: Callable[..., bool]
traced: Callable[[Any], bool]
grad_and_aux, hvp, host_call_if, traced = _BACKENDS[keras.backend.backend()]()
