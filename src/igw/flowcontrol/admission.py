"""Admission before scheduling. Today: a cap on the requests in flight through this EPP.

Priority-aware shedding of sheddable requests (priority < 0) on a saturated pool and the
queueing flow-control layer build on this stage.
"""

from __future__ import annotations

from collections.abc import Callable

from igw.api.errors import Shed
from igw.api.types import InferenceRequest
from igw.config.settings import AdmissionSettings


class Admission:
    def __init__(self, settings: AdmissionSettings, inflight: Callable[[], int]) -> None:
        self._limit = settings.max_inflight_requests
        self._inflight = inflight

    def admit(self, request: InferenceRequest) -> None:
        """Return if ``request`` may proceed; raise :class:`Shed` (429) if not."""
        if self._limit and self._inflight() >= self._limit:
            raise Shed(f"too many requests in flight (limit {self._limit}); retry later")
