"""What ``keras.ops`` does not abstract, per Keras backend.

Over *values* (tensors, not variables: the form JAX needs, the others accept):
``grad_and_aux(fn, values)``, the gradient of ``fn(values) -> (scalar, aux)``
and ``aux``, dense and of the values' shapes (TensorFlow gives embeddings
``IndexedSlices`` of unknown shape); ``hvp(fn, values, tangents)``, the
Hessian of the scalar ``fn(values)`` times ``tangents`` (forward over
reverse; reverse over reverse on torch). ``host_call_if(flag, function,
*args)`` calls ``function(*args)`` when a possibly traced bool is true, and
returns False where no host call fits (a TensorFlow XLA cluster).
``traced(x)``: whether ``x`` is symbolic (no Python branch on it).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["dense", "grad_and_aux", "host_call_if", "hvp", "traced"]


def dense(gradient: Any, like: Any) -> Any:
    """``gradient`` dense, of ``like``'s shape (``sparse=False``: JAX's BCOO;
    the reshape: TensorFlow's ``IndexedSlices``, whose shape a strategy loses)."""
    return ops.reshape(ops.convert_to_tensor(gradient, sparse=False), tuple(like.shape))


def _tensorflow():
    import tensorflow as tf

    def grad_and_aux(fn, values):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(values)
            loss, aux = fn(values)
        grads = tape.gradient(loss, values, unconnected_gradients="zero")
        return [dense(g, v) for g, v in zip(grads, values, strict=True)], aux

    def hvp(fn, values, tangents):
        with tf.autodiff.ForwardAccumulator(values, tangents) as accumulator:
            grads, _ = grad_and_aux(lambda v: (fn(v), ()), values)  # dense inside it
        return accumulator.jvp(grads, unconnected_gradients="zero")

    def host_call_if(flag, function, *args):
        if tf.executing_eagerly():
            if bool(flag):
                function(*args)
        elif tf.__internal__.get_enclosing_xla_context() is not None:
            return False
        else:
            tf.cond(flag, lambda: [tf.py_function(function, list(args), []),
                                   tf.constant(True)][1], lambda: tf.constant(False))
        return True

    return grad_and_aux, hvp, host_call_if, lambda x: not tf.executing_eagerly()


def _jax():
    import jax

    def traced(x):
        return isinstance(x, jax.core.Tracer)

    def host_call_if(flag, function, *args):
        if traced(flag):
            jax.lax.cond(flag, lambda: jax.debug.callback(function, *args), lambda: None)
        elif bool(flag):
            function(*args)
        return True

    return (lambda fn, values: jax.grad(fn, has_aux=True)(list(values)),
            lambda fn, values, tangents: jax.jvp(jax.grad(fn), (list(values),),
                                                 (list(tangents),))[1],
            host_call_if, traced)


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
            return full(torch.autograd.grad(loss, values, allow_unused=True), values), aux

    def hvp(fn, values, tangents):
        values = leaves(values)
        with torch.enable_grad():
            grads = torch.autograd.grad(fn(values), values, create_graph=True,
                                        allow_unused=True)
            pairs = [(g, t) for g, t in zip(grads, tangents, strict=True)  # g depends on v
                     if g is not None and g.requires_grad]
            products = torch.autograd.grad(
                [g for g, _ in pairs], values, grad_outputs=[t for _, t in pairs],
                allow_unused=True) if pairs else [None] * len(values)
        return full(products, values)

    def host_call_if(flag, function, *args):
        if bool(flag):
            function(*args)
        return True

    return grad_and_aux, hvp, host_call_if, lambda x: False  # Keras on torch is eager


_BACKENDS = {"tensorflow": _tensorflow, "jax": _jax, "torch": _torch}
if keras.backend.backend() not in _BACKENDS:
    raise ImportError(f"sophia_tf runs on the Keras backends {sorted(_BACKENDS)}, "
                      f"not {keras.backend.backend()!r}")
grad_and_aux, hvp, host_call_if, traced = _BACKENDS[keras.backend.backend()]()
