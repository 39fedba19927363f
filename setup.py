"""Build hook: the simulator's hot path (splitbench/native.py lists it) compiled with mypyc as one group, about 2x
faster simulations; pure Python where mypyc or a C compiler is missing, or with SPLITBENCH_PURE_PYTHON=1 set.
The build record (splitbench/native-build.json: each source's sha256) lets a stale build fall back to the sources.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).parent / "splitbench"))
import native  # noqa: E402  (splitbench/native.py: imports nothing of splitbench, so it loads without the package)


class BuildNative(build_ext):
    """build_ext that never fails the install: a failed compile leaves the pure-Python package (and says so);
    a successful one writes the build record next to the sources, where splitbench.native checks it."""

    def run(self) -> None:
        record = Path(__file__).parent / native.RECORD
        record.unlink(missing_ok=True)
        try:
            super().run()
        except Exception as e:   # no compiler, or the C build failed: the package still works, uncompiled
            print(f"splitbench: mypyc build failed ({e}); the simulator runs as pure Python", file=sys.stderr)
            return
        libraries = [e.name for e in self.extensions if e.name.endswith("__mypyc")]
        native.write_record(Path(__file__).parent, libraries)
        if not self.inplace and Path(self.build_lib, "splitbench").is_dir():   # a wheel: the record goes with it
            native.write_record(Path(self.build_lib), libraries)


def extensions() -> list:
    if os.environ.get(native.PURE_ENV):
        return []
    try:
        from mypyc.build import mypycify
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *native.SOURCES], opt_level="3")
    except (Exception, SystemExit) as e:   # mypyc missing, or it refused a module (it exits): pure Python
        print(f"splitbench: mypyc unavailable ({e}); the simulator runs as pure Python", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
