"""The core on array_api_strict: the reference's arithmetic uses only the standard.

Runs the flat-vector loop of the reference (array_api_strict is slow per
call); the per-parameter protocol is exercised by every other driver.
"""

from __future__ import annotations

import array_api_strict
import numpy as np

from ._numpy import ReferenceDriver

array_api_strict.set_array_api_strict_flags(api_version="2023.12")


class ArrayApiStrictDriver(ReferenceDriver):
    name = "array_api_strict"
    xp = array_api_strict
    # float32 (Python-scalar promotion matters there); float64 and the bf16
    # emulation would only repeat the numpy rows at the cost of a slow namespace.
    dtypes = ("float32",)

    def _to_numpy(self, array) -> np.ndarray:
        return np.array(np.from_dlpack(array), copy=True)


DRIVER = ArrayApiStrictDriver
