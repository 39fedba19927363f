"""The few Arrow compute kernels splitbench calls (cast, take, binary_join_element_wise), through pyarrow's kernel
registry (`pyarrow._compute.call_function`, which pyarrow.compute wraps) without importing pyarrow.compute: its
import wraps and documents about 290 functions, 0.05-0.09 s of a simulate command meant to take about a second.
"""
from __future__ import annotations

import pyarrow as pa
from pyarrow._compute import CastOptions, call_function


def cast(arr: pa.Array, target_type: pa.DataType) -> pa.Array:
    """pyarrow.compute.cast(arr, target_type): a safe cast (ArrowInvalid on overflow, truncation, bad text)."""
    return call_function("cast", [arr], CastOptions.safe(target_type))


def take(values: pa.Array, indices: pa.Array) -> pa.Array:
    """pyarrow.compute.take: values[indices], null where an index is null."""
    return call_function("take", [values, indices])


def binary_join_element_wise(*strings: pa.Array) -> pa.Array:
    """pyarrow.compute.binary_join_element_wise: row-wise join of the string arrays, the last one the separator."""
    return call_function("binary_join_element_wise", list(strings))
