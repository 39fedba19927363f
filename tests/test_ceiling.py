"""The client-ceiling store in hardware/ceiling.py: host ids, where the per-host file lives, the round trip per
worker count on real files, one-line errors for a broken file, and run.json's `client` section against it."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from splitbench.errors import InputError
from splitbench.hardware import ceiling as C
from splitbench.schema.runmeta import host_info


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path))
    return tmp_path


def test_host_id_is_file_name_safe_stable_and_tells_hosts_apart():
    here = C.host_id()
    assert here == C.host_id() == C.host_id(host_info())
    assert re.fullmatch(r"[A-Za-z0-9_.-]+-[0-9a-f]{10}", here)
    odd = {"hostname": "a b/c:d" + "x" * 60, "cpu_count": 2, "platform": "Linux"}
    hid = C.host_id(odd)
    assert hid.startswith("a-b-c-d") and "/" not in hid and " " not in hid and len(hid) == 40 + 11
    assert C.host_id({**odd, "cpu_count": 4}) != hid           # same name, other core count: another file
    assert C.host_id({"hostname": None}).startswith("host-")


def test_store_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITBENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.store_dir() == tmp_path / "xdg" / "splitbench" / "calibration"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert C.store_dir() == tmp_path / "home" / ".cache" / "splitbench" / "calibration"
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "sb"))
    assert C.store_dir() == tmp_path / "sb" / "calibration"
    assert C.store_path() == tmp_path / "sb" / "calibration" / f"{C.host_id()}.json"


def test_store_roundtrip_per_host_and_workers(cache):
    assert C.load_store() == {} and C.stored_ceiling(1) is None
    path = C.save_result({"workers": 1, "ceiling_rps": 1800.0, "created_unix_s": 1.0})
    C.save_result({"workers": 2, "ceiling_rps": 3000.0})
    assert path == C.store_path() and path.parent == cache / "calibration"
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # atomic: no temp file left behind
    data = json.loads(path.read_text())
    assert data["host_id"] == C.host_id() and data["host"]["hostname"] == host_info()["hostname"]
    assert sorted(data["ceilings"]) == ["1", "2"]
    assert C.stored_ceiling(1)["ceiling_rps"] == 1800.0 and C.stored_ceiling(2)["ceiling_rps"] == 3000.0
    C.save_result({"workers": 1, "ceiling_rps": 1700.0})            # a new calibration replaces its own entry only
    assert C.stored_ceiling(1)["ceiling_rps"] == 1700.0 and C.stored_ceiling(2)["ceiling_rps"] == 3000.0
    other = cache / "elsewhere.json"                                 # an explicit path is its own store
    C.save_result({"workers": 1, "ceiling_rps": 5.0}, other)
    assert C.stored_ceiling(1, other)["ceiling_rps"] == 5.0 and C.stored_ceiling(1)["ceiling_rps"] == 1700.0


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"ceilings": [1]}'])
def test_broken_store_is_a_one_line_error_naming_the_file(cache, text):
    path = C.store_path()
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(InputError) as e:
        C.stored_ceiling(1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:") and "unreadable calibration file" in msg
    with pytest.raises(InputError):
        C.save_result({"workers": 1, "ceiling_rps": 1.0})           # never overwrites what it cannot read
    assert path.read_text() == text


def test_client_section_against_the_stored_ceiling(cache):
    arrivals = np.arange(2048) / 1024                               # exact binary fractions: 1024 per second
    none = C.client_section(arrivals)
    assert none == {"workers": 1, "peak_offered_rps": 1024.0, "ceiling_rps": None, "headroom": None,
                    "calibration": None}
    C.save_result({"workers": 1, "ceiling_rps": 1800.0, "created_unix_s": 1.0, "tokens_per_s": 9.0, "extra": 1})
    sec = C.client_section(arrivals, workers=1)
    assert sec["ceiling_rps"] == 1800.0 and sec["peak_offered_rps"] == 1024.0 and sec["headroom"] == 1800.0 / 1024
    assert sec["calibration"] == {"created_unix_s": 1.0, "tokens_per_s": 9.0, "cpu_s_per_request": None,
                                  "workload": None, "path": None, "lag_p99_median_s": None}
    C.save_result({"workers": 2, "ceiling_rps": 900.0, "points": [{"lag_p99_s": x} for x in (0.004, 0.001, 0.002)]
                   + [{"lag_p99_s": None}, {}]})
    assert C.client_section(arrivals, workers=2)["calibration"]["lag_p99_median_s"] == 0.002   # of the 3 measured
    assert C.client_section(arrivals, workers=3)["ceiling_rps"] is None   # calibrated for 1 worker only
    empty = C.client_section(np.array([]))
    assert empty["peak_offered_rps"] == 0.0 and empty["ceiling_rps"] == 1800.0 and empty["headroom"] is None
    C.save_result({"workers": 2})                                    # an entry without a ceiling: said, not raised
    assert "no ceiling_rps" in C.client_section(arrivals, workers=2)["error"]
    C.store_path().write_text("{not json")                           # a broken file: said, not raised
    broken = C.client_section(arrivals)
    assert "unreadable calibration file" in broken["error"] and broken["ceiling_rps"] is None
