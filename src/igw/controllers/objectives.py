"""InferenceObjective, InferenceModelRewrite and legacy InferenceModel -> objective and rewrite stores.

Three reflectors over the pool's namespace; after any change the whole state is recomputed
from the three caches and written at once (level-triggered):

* priorities: the legacy models' objectives, overridden by InferenceObjectives of the same name;
* rewrite rules: InferenceModelRewrite rules (oldest resource first, rules in order), then the
  legacy models' ``targetModels``; an exact model match beats a match-all rule;
* per-model default objectives (legacy ``criticality``).

Every resource is optional: a CRD that is not installed (404) counts as empty, so an EPP on a
cluster with only the InferencePool CRD runs with priority 0 and no rewrites. Readiness does not
wait for these (as the reference, it follows the pool).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kubernetes_asyncio import client

from igw.controllers.reflector import Reflector, WatchSettings
from igw.controllers.resources import POOL_GROUP, X_GROUP, legacy_models, objective_priorities, rewrite_rules
from igw.datalayer.objectives import ObjectiveStore
from igw.datalayer.rewrites import RewriteStore

log = logging.getLogger("igw.controllers")

X_VERSION = "v1alpha2"


class ObjectiveController:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        pool_name: str,
        namespace: str,
        objectives: ObjectiveStore,
        rewrites: RewriteStore,
        pool_group: str = POOL_GROUP,
        legacy: bool = True,
        settings: WatchSettings | None = None,
        on_state: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool_name, self.namespace, self.pool_group = pool_name, namespace, pool_group
        self._objectives, self._rewrites = objectives, rewrites
        self._on_state = on_state
        custom = client.CustomObjectsApi(api)

        def reflector(kind: str, plural: str) -> Reflector:
            return Reflector(
                name=f"{kind} {namespace}/*",
                list_fn=custom.list_namespaced_custom_object,
                args=(X_GROUP, X_VERSION, namespace, plural),
                on_change=self._recompute,
                settings=settings,
                optional=True,
            )

        self.objective_reflector = reflector("InferenceObjective", "inferenceobjectives")
        self.rewrite_reflector = reflector("InferenceModelRewrite", "inferencemodelrewrites")
        self.model_reflector = reflector("InferenceModel", "inferencemodels") if legacy else None
        self._last: tuple[object, ...] | None = None

    @property
    def reflectors(self) -> list[Reflector]:
        out = [self.objective_reflector, self.rewrite_reflector]
        if self.model_reflector is not None:
            out.append(self.model_reflector)
        return out

    @property
    def synced(self) -> bool:
        return all(r.synced for r in self.reflectors)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for r in self.reflectors:
                group.create_task(r.run(), name=f"igw.controllers {r.name}")

    def _recompute(self) -> None:
        legacy = legacy_models(self.model_reflector.objects.values(), self.pool_name) if self.model_reflector else None
        priorities = dict(legacy.priorities) if legacy else {}
        priorities.update(
            objective_priorities(self.objective_reflector.objects.values(), self.pool_name, self.pool_group)
        )
        rules = rewrite_rules(self.rewrite_reflector.objects.values(), self.pool_name, self.pool_group)
        if legacy:
            rules.extend(legacy.rules)
        model_objectives = legacy.model_objectives if legacy else {}
        state = (priorities, rules, model_objectives)
        if state == self._last:
            return
        self._last = state
        self._objectives.set_objectives(priorities)
        self._rewrites.set_rules(rules)
        self._rewrites.set_model_objectives(model_objectives)
        log.info(
            "pool %s: %d objective(s), %d rewrite rule(s), %d legacy model(s)",
            self.pool_name, len(priorities), len(rules), len(model_objectives),
        )  # fmt: skip
        self._on_state()
