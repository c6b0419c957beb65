#!/usr/bin/env python3
"""Compile the replay's hot modules (``igw_sim.replay``) with mypyc, for ~1.8x faster replays.

    .venv/bin/python tools/build_replay_ext.py            # build if the sources changed (~35 s), else 0.1 s
    .venv/bin/python tools/build_replay_ext.py --force    # rebuild
    .venv/bin/python tools/build_replay_ext.py --clean    # remove the build: pure Python again
    .venv/bin/python -c "import igw_sim.replay as r; print(r.compiled())"

The extensions go to ``build/replay-ext/<EXT_SUFFIX>/igw_sim/replay/`` (git-ignored with ``build/``),
never next to the sources, with a ``stamp.json`` of the sources' digest. ``igw_sim.replay`` loads them
only while that digest equals the sources on disk (see ``igw_sim/replay/_compiled.py``): after any edit
under ``src/igw_sim`` it runs as pure Python again until the next build, so a stale build never hides a
change. ``IGW_SIM_PURE=1`` forces pure Python. The results are the same either way, request for request.

Needs mypy (which ships mypyc), setuptools and a C compiler; the build type-checks the modules first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))

from igw_sim.replay import _compiled  # noqa: E402 (needs the src path)

_SETUP = """\
import sys
from setuptools import setup
from mypyc.build import mypycify

paths, group = sys.argv[1:-1], sys.argv[-1]
sys.argv = [sys.argv[0], "build_ext", "--inplace", "--build-temp", "build-temp"]
setup(name="igw-sim-replay-ext", ext_modules=mypycify(paths, opt_level="3", group_name=group), py_modules=[])
"""


def build(root: Path, digest: str) -> None:
    """Compile in a scratch copy of ``src/igw_sim``, then move the extensions into ``root``."""
    with tempfile.TemporaryDirectory(prefix="igw-replay-ext-") as tmp:
        work = Path(tmp)
        shutil.copytree(SRC / "igw_sim", work / "igw_sim", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        (work / "setup_ext.py").write_text(_SETUP)
        # mypyc type-checks first; `make typecheck` holds the strict check, this one only needs the imports.
        (work / "mypy.ini").write_text("[mypy]\npython_version = 3.11\nignore_missing_imports = True\n")
        paths = [f"igw_sim/replay/{name}.py" for name in _compiled.HOT_MODULES]
        cmd = [sys.executable, "setup_ext.py", *paths, "igw_sim.replay._native"]
        env = {**os.environ, "MYPY_FORCE_COLOR": "0"}
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"build_replay_ext: mypyc failed (exit {proc.returncode})")
        built = sorted((work / "igw_sim" / "replay").glob("*.so"))
        if len(built) != len(_compiled.HOT_MODULES) + 1:  # one per module plus the shared library
            raise SystemExit(f"build_replay_ext: expected {len(_compiled.HOT_MODULES) + 1} extensions, got {built}")
        shutil.rmtree(root, ignore_errors=True)
        target = root / "igw_sim" / "replay"
        target.mkdir(parents=True)
        for so in built:
            shutil.copy2(so, target / so.name)
    stamp = {"digest": digest, "modules": list(_compiled.HOT_MODULES), "python": sys.version, "built": time.time()}
    (root / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even when the build is up to date")
    parser.add_argument("--clean", action="store_true", help="remove the build (the replay runs as pure Python)")
    args = parser.parse_args()
    root = _compiled.build_root()
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
        print(f"build_replay_ext: removed {root.relative_to(REPO)}")
        return 0
    digest = _compiled.source_digest()
    stamp = root / "stamp.json"
    if not args.force and stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest:
        print(f"build_replay_ext: up to date ({root.relative_to(REPO)})")
        return 0
    start = time.monotonic()
    build(root, digest)
    print(f"build_replay_ext: built {len(_compiled.HOT_MODULES)} modules in {time.monotonic() - start:.0f} s")
    check = "import igw_sim.replay as r; print('compiled' if r.compiled() else 'pure Python')"
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    print(f"build_replay_ext: igw_sim.replay loads: {out.stdout.strip()}")
    return 0 if out.stdout.strip() == "compiled" else 1


if __name__ == "__main__":
    sys.exit(main())
