"""igw_sim: a vLLM-compatible simulator (imports nothing from igw).

Modules: :mod:`~igw_sim.tokenizer` (toy tokenizer), :mod:`~igw_sim.engine` (continuous-batching model),
:mod:`~igw_sim.metrics` (vLLM-named Prometheus families), :mod:`~igw_sim.protocol` (OpenAI shapes),
:mod:`~igw_sim.server` (aiohttp app of one endpoint), :mod:`~igw_sim.fleet` (N endpoints in one process),
:mod:`~igw_sim.cli` (``python -m igw_sim``).
"""

from igw_sim.engine import Engine, EngineConfig
from igw_sim.fleet import SimFleet
from igw_sim.server import SimServer

__all__ = ["Engine", "EngineConfig", "SimFleet", "SimServer"]
