"""Virtual-time replays: the simulator's engine model, N engines, one routing policy, in seconds.

``python -m igw_sim replay --engines 64 --workload w1:qps=40 --policies all`` (see
:mod:`igw_sim.replay.cli` and ``docs/simulator.md`` section 6). The pieces:

* :mod:`~igw_sim.replay.requests`: requests as named segments of tokens (plain data);
* :mod:`~igw_sim.replay.workloads`: seeded generators (W1, W4, W5, W6, W7) and JSONL files;
* :mod:`~igw_sim.replay.fastengine`: the event-jumping engine (default);
* :mod:`~igw_sim.replay.exactengine`: the real-time simulator's ``EngineCore`` on a virtual clock;
* :mod:`~igw_sim.replay.routers`: the ``Router`` and ``EngineView`` protocols and built-in policies;
* :mod:`~igw_sim.replay.driver`: the discrete-event loop;
* :mod:`~igw_sim.replay.results`: what is measured, and the comparison table.

The hot modules may run compiled by mypyc (``tools/build_replay_ext.py``, see
:mod:`~igw_sim.replay._compiled`): an up-to-date build is put in front of this package's ``__path__``
here, before anything is imported; :func:`compiled` tells which variant is loaded.
"""

# ruff: noqa: E402 (the compiled build must be on __path__ before the submodules are imported)

import sys

from igw_sim.replay import _compiled

_ext = _compiled.ext_dir()
if _ext is not None:
    __path__.insert(0, str(_ext))

from igw_sim.replay.driver import ReplayRun, run_replay
from igw_sim.replay.exactengine import ExactEngine
from igw_sim.replay.fastengine import FastEngine, RejectedError
from igw_sim.replay.requests import SimRequest
from igw_sim.replay.results import PolicySummary, Recorder
from igw_sim.replay.routers import ROUTERS, EngineView, Router, make_router
from igw_sim.replay.workloads import Workload, build_workload

__all__ = [
    "ROUTERS",
    "EngineView",
    "ExactEngine",
    "FastEngine",
    "PolicySummary",
    "Recorder",
    "RejectedError",
    "ReplayRun",
    "Router",
    "SimRequest",
    "Workload",
    "build_workload",
    "compiled",
    "make_router",
    "run_replay",
]


def compiled() -> bool:
    """Whether the replay's hot modules are the mypyc-compiled C extensions (else pure Python)."""
    for name in _compiled.HOT_MODULES:
        path = getattr(sys.modules.get(f"{__name__}.{name}"), "__file__", None) or ".py"
        if path.endswith(".py"):
            return False
    return True
