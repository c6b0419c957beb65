"""igw_sim: a vLLM twin for ranking routers (imports nothing from igw).

Pure model (no clock, no I/O): :mod:`~igw_sim.hashing` (chained block hashes),
:mod:`~igw_sim.kvcache` (paged KV cache with prefix caching), :mod:`~igw_sim.scheduler` (vLLM v1's
continuous batching, chunked prefill, preemption, LoRA slots), :mod:`~igw_sim.profiles` (step-time
models calibrated on H100 figures), :mod:`~igw_sim.config`, :mod:`~igw_sim.kvevents` (KV event wire
encoding), :mod:`~igw_sim.tokenizer` (toy tokenizer), :mod:`~igw_sim.stats`.

Real time and I/O: :mod:`~igw_sim.engine` (drives the core on the event loop's clock),
:mod:`~igw_sim.kvpublisher` (ZMQ PUB and replay), :mod:`~igw_sim.metrics` (vLLM- or SGLang-named
Prometheus families), :mod:`~igw_sim.faults`, :mod:`~igw_sim.protocol` (OpenAI shapes),
:mod:`~igw_sim.server` (aiohttp app of one endpoint), :mod:`~igw_sim.fleet` (N endpoints in one process),
:mod:`~igw_sim.cli` (``python -m igw_sim``). See ``docs/simulator.md``.
"""

from igw_sim.config import EngineConfig
from igw_sim.engine import Engine
from igw_sim.fleet import SimFleet
from igw_sim.profiles import PRESETS, LatencyProfile
from igw_sim.scheduler import EngineCore
from igw_sim.server import SimServer

__all__ = ["PRESETS", "Engine", "EngineConfig", "EngineCore", "LatencyProfile", "SimFleet", "SimServer"]
