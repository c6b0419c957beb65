"""``single-profile-handler``: run the one scheduling profile; its result routes the request.

``pick_profiles`` returns the profile until it has run, then nothing. ``process_results``
returns its result, or raises :class:`~igw.api.errors.SchedulingFailed` naming the profile when it
found no endpoint. It is meant for exactly one profile: the config loader calls
:meth:`SingleProfileHandler.validate_profiles` and refuses any other count. If it is handed
several anyway, it raises ``ValueError`` (the request fails with 500) instead of guessing.
No parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from igw.api.errors import SchedulingFailed
from igw.api.types import InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import ProfileHandler, SchedulerProfile, SchedulingResult


@register
class SingleProfileHandler(ProfileHandler):
    type_name = "single-profile-handler"

    def validate_profiles(self, names: Iterable[str]) -> None:
        """Raise ``ValueError`` unless ``names`` holds exactly one profile name."""
        names = list(names)
        if len(names) != 1:
            listed = ", ".join(repr(n) for n in names) or "none"
            raise ValueError(
                f"profile handler {self.name!r} ({self.type_name}) needs exactly one scheduling profile, "
                f"got {len(names)}: {listed}"
            )

    def pick_profiles(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, SchedulingResult | None],
    ) -> list[SchedulerProfile]:
        self.validate_profiles(profiles)
        (profile,) = profiles.values()
        return [] if profile.name in results else [profile]

    def process_results(
        self, request: InferenceRequest, results: Mapping[str, SchedulingResult | None]
    ) -> SchedulingResult:
        self.validate_profiles(results)
        ((name, result),) = results.items()
        if result is None:
            raise SchedulingFailed(f"scheduling profile {name!r} found no endpoint")
        return result
