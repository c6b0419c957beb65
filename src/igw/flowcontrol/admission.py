"""Admission before scheduling (the reference's default "legacy" admission, plus two igw limits).

In order, a request is shed with 429 when:

1. more than ``max_inflight_requests`` requests are in flight through this EPP (0: no cap);
2. it is *sheddable* (priority below zero, from its InferenceObjective) and the saturation
   detector says the candidate endpoints are saturated (saturation >= 1.0). Requests with
   priority >= 0 always pass this step: they queue on the model servers instead;
3. an Admitter plugin refuses it (all must admit; one that raises fails open).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from igw.api.errors import Shed
from igw.api.types import EndpointState, InferenceRequest
from igw.config.settings import AdmissionSettings
from igw.framework.requestcontrol import Admitter, SaturationDetector
from igw.observability.metrics import PluginMetrics, TimedPlugin

log = logging.getLogger("igw.flowcontrol")


class Admission:
    def __init__(
        self,
        settings: AdmissionSettings,
        inflight: Callable[[], int],
        *,
        detector: SaturationDetector | None = None,
        admitters: Sequence[Admitter] = (),
        metrics: PluginMetrics | None = None,
    ) -> None:
        self._limit = settings.max_inflight_requests
        self._inflight = inflight
        self.detector = detector
        self._detector = TimedPlugin(detector, "Saturation", metrics) if detector is not None else None
        self.admitters = tuple(admitters)
        self._admitters = [TimedPlugin(a, "AdmitRequest", metrics) for a in admitters]

    def admit(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        """Return if ``request`` may proceed; raise :class:`Shed` (429) if not."""
        if self._limit and self._inflight() >= self._limit:
            raise Shed(f"too many requests in flight (limit {self._limit}); retry later")
        if request.priority < 0 and self._detector is not None:
            # A detector that fails says "not saturated": the request is admitted (fail open).
            saturation = self._detector.guarded(self._detector.plugin.saturation, candidates) or 0.0
            if saturation >= 1.0:
                raise Shed(
                    f"the pool is saturated ({saturation:.2f}) and this request is sheddable "
                    f"(objective {request.objective!r}, priority {request.priority}); retry later"
                )
        for timed in self._admitters:
            t0 = time.perf_counter()
            try:
                timed.plugin.admit(request, candidates)
            except Shed:
                raise
            except Exception:
                log.exception("admitter %s failed; admitting the request", timed.plugin.name)
                timed.errors()
            finally:
                timed.observe(time.perf_counter() - t0)
