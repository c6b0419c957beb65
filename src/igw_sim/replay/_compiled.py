"""Where the mypyc-compiled variant of the replay's hot modules lives, and whether it may be used.

``tools/build_replay_ext.py`` compiles :data:`HOT_MODULES` with mypyc into C extensions under
``build/replay-ext/<EXT_SUFFIX>/igw_sim/replay/`` (git-ignored; for example
``cpython-311-x86_64-linux-gnu``), with a ``stamp.json`` holding
:func:`source_digest` of the sources it compiled. :func:`ext_dir` returns that directory only when the
stamp equals the digest of the sources now on disk, so an edited module is never shadowed by a stale
build: the replay silently runs as pure Python until the next build. ``IGW_SIM_PURE=1`` forces pure
Python. The package puts the directory in front of its ``__path__`` before importing anything else
(``igw_sim/replay/__init__.py``), so the same module names load either variant.

The digest covers every module of ``igw_sim``, not only the compiled ones: compiled code trusts the
types of what it imports (``EngineConfig``, ``LatencyProfile``), so a change there needs a rebuild too.
This module imports only the standard library: the build tool reads it before building.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

__all__ = ["HOT_MODULES", "PACKAGE_ROOT", "build_root", "ext_dir", "source_digest"]

HOT_MODULES = ("driver", "fastengine", "requests", "results", "routers", "workloads")
"""The modules of ``igw_sim.replay`` that are compiled (everything a replay runs per request)."""

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""``src/igw_sim``."""


def build_root() -> Path:
    """``build/replay-ext/<EXT_SUFFIX without .so>`` of the checkout (one build per Python and platform)."""
    suffix = Path(str(sysconfig.get_config_var("EXT_SUFFIX") or ".ext")).stem.lstrip(".")
    return PACKAGE_ROOT.parents[1] / "build" / "replay-ext" / suffix


def source_digest() -> str:
    """SHA-256 over the path and contents of every ``igw_sim`` module, in path order."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def ext_dir() -> Path | None:
    """The directory of an up-to-date compiled build, or ``None`` (none, stale, or ``IGW_SIM_PURE=1``)."""
    if os.environ.get("IGW_SIM_PURE", "") not in ("", "0"):
        return None
    root = build_root()
    try:
        stamp = (root / "stamp.json").read_text()
    except OSError:
        return None
    if f'"{source_digest()}"' not in stamp:
        return None
    return root / "igw_sim" / "replay"
