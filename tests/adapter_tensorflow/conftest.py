"""The Keras adapter's tests run on the Keras backend named by SOPHIA_KERAS_BACKEND.

In-process that is TensorFlow (the ``tensorflow`` nox session's framework);
``test_keras_backends.py`` runs the backend-neutral modules again under JAX
and torch in subprocesses. Set before any test module imports Keras.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = os.environ.get("SOPHIA_KERAS_BACKEND", "tensorflow")
