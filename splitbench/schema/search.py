"""search.json: the declared, versioned result of `splitbench search` (one or more capacity searches, each probe a run
directory beside it), its one writer and its one loader."""

import os
from pathlib import Path
from typing import Any, Required, TypedDict

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_json, check_version, read_json_object
from splitbench.schema.typed import field_types, first_problem

SEARCH_KIND = "splitbench.search"
SEARCH_VERSION = 1
SEARCH_FILE = "search.json"


class SearchResult(TypedDict, total=False):
    """Every top-level key of search.json."""
    kind: Required[str]                   # SEARCH_KIND
    version: Required[int]                # SEARCH_VERSION; stamped by write_search
    search_id: Required[str]
    status: Required[str]                 # running | complete | interrupted | failed
    simulated: Required[bool]             # every probe simulated (search --simulate)
    spec: Required[dict[str, Any]]        # what the probes measure (must match to resume) and the search budget
    options: dict[str, Any]               # the run (or simulation) options every probe shares
    searches: Required[list]              # one per configuration: label, config, points, analysis, capacity
    best: str                             # label of the configuration with the highest capacity (sweeps)
    predictions: list                     # --predict: the same searches on the simulator from a profile
    comparison: list                      # --predict: label, measured and predicted capacity, relative error
    created_unix_s: float
    error: str


FIELD_TYPES = field_types(SearchResult)
REQUIRED = tuple(sorted(SearchResult.__required_keys__))
SEARCH_ITEM_KEYS = ("label", "config", "points", "analysis", "capacity")


def _path(where: str | os.PathLike) -> Path:
    p = Path(where)
    return p if p.suffix == ".json" else p / SEARCH_FILE


def _problem(data: dict) -> tuple[str, str] | None:
    bad = first_problem(data, FIELD_TYPES, REQUIRED)
    if bad:
        return bad
    for k, s in enumerate(data["searches"] + list(data.get("predictions") or [])):
        if not isinstance(s, dict):
            return f"searches[{k}]", "expected an object"
        for key in SEARCH_ITEM_KEYS:
            if key not in s:
                return f"searches[{k}].{key}", "required field is missing"
        if not isinstance(s["points"], list):
            return f"searches[{k}].points", "expected a list"
    return None


def write_search(where: str | os.PathLike, result: SearchResult | dict) -> Path:
    """Write SEARCH_DIR/search.json atomically, stamped with kind and version; ValueError when a field is wrong."""
    out = {**result, "kind": SEARCH_KIND, "version": SEARCH_VERSION}
    bad = _problem(out)
    if bad:
        raise ValueError(f"search field {bad[0]!r}: {bad[1]}")
    path = _path(where)
    atomic_write_json(path, out)
    return path


def read_search(where: str | os.PathLike) -> SearchResult:
    """SEARCH_DIR/search.json (or the .json path), validated; one-line InputError naming the file and field."""
    path = _path(where)
    data = read_json_object(path, "search result")
    if data.get("kind") != SEARCH_KIND:
        raise InputError(f"not a splitbench search result (kind {data.get('kind')!r})", file=str(path),
                         column="kind")
    check_version(data.get("version"), SEARCH_VERSION, "search version", "search version", path)
    bad = _problem(data)
    if bad:
        raise InputError(f"invalid search result: {bad[1]}", file=str(path), column=bad[0])
    return data  # type: ignore[return-value]
