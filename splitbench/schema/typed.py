"""Runtime checks of the TypedDicts that declare splitbench's JSON files (run.json, summary.json): the declared
key -> type table, and the first problem of an object against it."""

import types
import typing
from typing import Any


def _runtime_types(hint: Any) -> tuple[type, ...]:
    """The isinstance() classes of one annotation (float also accepts int: JSON writes 1.0 as 1)."""
    if hint is Any:
        return (object,)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for a in typing.get_args(hint) for t in _runtime_types(a))
    origin = typing.get_origin(hint) or hint
    return (int, float) if origin is float else (origin,)


def field_types(td: type) -> dict[str, tuple[type, ...]]:
    """key -> accepted classes of a TypedDict (its annotations must be real objects, not strings)."""
    return {k: _runtime_types(h) for k, h in typing.get_type_hints(td).items()}


def first_problem(obj: dict, fields: dict[str, tuple[type, ...]], required: typing.Iterable[str],
                  ) -> tuple[str, str] | None:
    """(key, what is wrong) for the first missing required key or declared key of the wrong type; None if fine.
    A null value of an optional key and undeclared keys pass."""
    for key in required:
        if obj.get(key) is None:
            return key, "required field is missing"
    for key, value in obj.items():
        want = fields.get(key)
        if want is None or value is None:
            continue
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want and object not in want):
            return key, f"expected {' or '.join(t.__name__ for t in want)}, got {type(value).__name__}"
    return None
