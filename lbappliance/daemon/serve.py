"""Serving: plan what is published, apply it, and when HAProxy refuses some Services' sections
only, serve the others without them.

Every apply tries the refused Services again (level-triggered), so one whose cause goes away
comes back on its own; each refused one gets an InvalidConfiguration problem, hence an Event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

from ..core.kube import published_only
from ..core.models import Allocation, DesiredState, Problem, Reason
from ..core.plan import Snapshot, plan
from ..core.report import refusal_message
from ..edges.apply import ApplyResult

log = logging.getLogger("lbappliance.serve")
MAX_REFUSAL_ROUNDS = 3  # applies left to find every Service HAProxy refuses, before keeping the last good config


class Applier(Protocol):
    def apply(self, state: DesiredState) -> ApplyResult: ...


@dataclass(frozen=True)
class Served:
    """The state applied (with the refusals among its problems), the last apply's result, the refusals."""

    state: DesiredState
    result: ApplyResult
    refusals: tuple[Problem, ...]


def serve(snapshot: Snapshot, allocation: Allocation, data_plane: Applier) -> Served:
    """Apply the published part of `allocation`, leaving out any Service HAProxy refuses."""
    published = replace(allocation, assignments=published_only(allocation.assignments, snapshot.services))
    refused: dict[str, str] = {}
    state = plan(snapshot, published)
    result = data_plane.apply(state)
    for _ in range(MAX_REFUSAL_ROUNDS):
        if result.kind != "rejected" or not result.refused_services:
            break
        for key in sorted(result.refused_services - set(refused)):
            log.error("Service %s: HAProxy refuses its config; serving the other Services without it", key)
            refused[key] = refusal_message(result.message)
        kept = {k: v for k, v in published.assignments.items() if k not in refused}
        state = plan(snapshot, replace(published, assignments=kept))
        result = data_plane.apply(state)
    refusals = tuple(Problem(key, Reason.INVALID, message) for key, message in sorted(refused.items()))
    return Served(replace(state, problems=tuple(sorted({*state.problems, *refusals}))), result, refusals)
