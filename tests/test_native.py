"""The simulator's compiled group (splitbench/native.py, built by setup.py with mypyc): the install compiled it, a
compiled and a pure-Python simulation write the same records, and a stale or partial build falls back to the sources."""
from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from splitbench import native

ROOT = Path(native.__file__).resolve().parent.parent


def _simulate(tmp_path: Path, name: str, pure: bool) -> tuple[pd.DataFrame, dict]:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure:
        env[native.PURE_ENV] = "1"
    code = ("import json, sys; from splitbench import native; import splitbench.sim.cluster as c; "
            "from splitbench.cli import main; "
            "print(json.dumps({'status': native.STATUS, 'file': c.__file__}), file=sys.stderr); main()")
    args = ["simulate", "--cluster", "splitwise-hh:3,2", "--policy", "mixed-pool", "--trace", "azure-code-2023",
            "--max-requests", "1500", "--rate-scale", "2", "--results", str(tmp_path), "--run-id", name, "--json"]
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stderr.strip().splitlines()[0])
    return pd.read_parquet(tmp_path / name / "records.parquet").drop(columns=["run_id"]), info


def test_the_install_compiled_the_group():
    if os.environ.get(native.PURE_ENV):
        pytest.skip(f"{native.PURE_ENV} is set: the sources are used on purpose")
    assert native.STATUS["compiled"], f"install.sh should have compiled the simulator: {native.STATUS['why']}"
    import splitbench.sim.cluster as c
    assert Path(c.__file__).suffix != ".py"


def test_compiled_and_pure_simulations_write_the_same_records(tmp_path):
    compiled, ci = _simulate(tmp_path, "compiled", pure=False)
    pure, pi = _simulate(tmp_path, "pure", pure=True)
    assert pi["file"].endswith("cluster.py") and not pi["status"]["compiled"]
    assert ci["status"]["compiled"] == native.STATUS["compiled"]
    assert (pure["pool"] == "mixed").any(), "the run should borrow into the mixed pool (policy path exercised)"
    pd.testing.assert_frame_equal(compiled, pure)


def _fake_build(root: Path) -> None:
    for p in native.SOURCES:
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"# {p}\n")
        (root / (p[:-3] + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    native.write_record(root, ["json"])   # a library that can be found stands in for mypyc's


def test_a_stale_or_partial_build_is_not_used(tmp_path, monkeypatch):
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    _fake_build(tmp_path)
    assert native._why_not(tmp_path) is None
    (tmp_path / native.SOURCES[3]).write_text("# edited after the build\n")
    assert "older than the sources" in native._why_not(tmp_path)
    _fake_build(tmp_path)
    (tmp_path / (native.SOURCES[0][:-3] + importlib.machinery.EXTENSION_SUFFIXES[0])).unlink()
    assert "incomplete" in native._why_not(tmp_path)
    _fake_build(tmp_path)
    native.write_record(tmp_path, ["no_such_library__mypyc"])
    assert "incomplete" in native._why_not(tmp_path)
    (tmp_path / native.RECORD).unlink()
    assert "not compiled" in native._why_not(tmp_path)
    _fake_build(tmp_path)
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.PURE_ENV in native._why_not(tmp_path)


def test_the_source_finder_loads_the_py_file(tmp_path):
    (tmp_path / "pkg_native_probe.py").write_text("VALUE = 42\n")
    finder = native._SourcesFirst({"pkg_native_probe": tmp_path / "pkg_native_probe.py"})
    spec = finder.find_spec("pkg_native_probe")
    assert spec is not None and spec.origin == str(tmp_path / "pkg_native_probe.py")
    assert finder.find_spec("json") is None
