"""Job and delivery states, the transitions allowed between them, and the one function that moves a job.

A job changes state only through :func:`transition`: a single conditional
``UPDATE jobs SET state = :new WHERE id = :id AND state IN (:expected)`` that raises when no row
matched (someone else moved the job first), followed by an append-only ``job_events`` row. Rows are
never deleted to dequeue a job, so a crash at any point leaves a job in a state that start-up
recovery knows how to handle.

Job state machine::

    PENDING --claim--> RUNNING --plan ok--> SUCCEEDED
       |                  |  \\--plan error / timeout / too many attempts--> FAILED
       |                  |  \\--node stopped or planning process crashed--> PENDING (retried)
       |                  \\--airt jobs cancel--> CANCELLED
       |--newer instance set of the same study--> SUPERSEDED
       |--airt jobs cancel--> CANCELLED
    (created directly as FAILED when the study can never be planned)
    FAILED / CANCELLED / SUPERSEDED --airt jobs retry--> PENDING
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import AirtError

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    """Where a planning job is in its life."""

    PENDING = "PENDING"
    """Waiting for a worker."""
    RUNNING = "RUNNING"
    """Claimed by a worker; planning in progress."""
    SUCCEEDED = "SUCCEEDED"
    """Planned; outputs written; one delivery row per destination created."""
    FAILED = "FAILED"
    """Cannot be planned as it is; ``failure_reason`` says why and what to do."""
    CANCELLED = "CANCELLED"
    """Stopped by a person (``airt jobs cancel``)."""
    SUPERSEDED = "SUPERSEDED"
    """Never started because the study received new instances; a newer job replaces it."""


class DeliveryState(enum.StrEnum):
    """Where the sending of one job's results to one destination is."""

    PENDING = "PENDING"
    """Waiting for its next try (``next_try_at``)."""
    SENDING = "SENDING"
    """An association to the destination is open."""
    DELIVERED = "DELIVERED"
    """Every C-STORE (RT Plan, then RT Dose) answered Success or Warning."""
    FAILED = "FAILED"
    """Given up after ``delivery.give_up_after_s``; ``airt jobs retry`` re-queues it."""


ALLOWED_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.SUPERSEDED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.PENDING, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.CANCELLED: frozenset({JobState.PENDING}),
    JobState.SUPERSEDED: frozenset({JobState.PENDING}),
}
"""For each job state, the states a job may move to from it."""

ALLOWED_DELIVERY_TRANSITIONS: Mapping[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.PENDING: frozenset({DeliveryState.SENDING, DeliveryState.FAILED}),
    DeliveryState.SENDING: frozenset({DeliveryState.DELIVERED, DeliveryState.PENDING, DeliveryState.FAILED}),
    DeliveryState.DELIVERED: frozenset({DeliveryState.PENDING}),
    DeliveryState.FAILED: frozenset({DeliveryState.PENDING}),
}
"""For each delivery state, the states a delivery may move to (DELIVERED -> PENDING: resend by hand)."""


class TransitionError(AirtError):
    """A job or delivery was not in any of the states a transition expected (someone moved it first)."""


def utcnow() -> dt.datetime:
    """The current time, UTC-aware."""
    return dt.datetime.now(dt.UTC)


def transition(
    session: Session,
    job_id: int,
    expected: Iterable[JobState],
    new: JobState,
    reason: str | None = None,
    *,
    values: Mapping[str, Any] | None = None,
) -> None:
    """Move job ``job_id`` from one of ``expected`` to ``new`` and record the event.

    One conditional UPDATE (``WHERE id = ? AND state IN (expected)``) so that two workers or a
    worker and a person cannot both move the same job; then an append-only ``job_events`` row.
    The caller commits.

    Parameters
    ----------
    session
        An open session; the change is part of its transaction.
    job_id
        Primary key of the job.
    expected
        States the job must be in; each must allow ``new`` in :data:`ALLOWED_TRANSITIONS`.
    new
        The state to move to.
    reason
        Why, in words for a physicist (stored on the event; on FAILED/CANCELLED also as
        ``failure_reason``).
    values
        Further columns of ``jobs`` to set in the same UPDATE (timestamps, attempts, ...).

    Raises
    ------
    ValueError
        If a transition from an ``expected`` state to ``new`` is not allowed (a programming error).
    TransitionError
        If the job does not exist or is in none of the ``expected`` states.
    """
    from storage.models import Job, JobEvent

    exp = frozenset(expected)
    bad = [s for s in exp if new not in ALLOWED_TRANSITIONS[s]]
    if bad or not exp:
        raise ValueError(f"job transition {sorted(bad)} -> {new} is not allowed")
    now = utcnow()
    cols: dict[str, Any] = {"state": new, "updated_at": now}
    if new in (JobState.FAILED, JobState.CANCELLED, JobState.SUPERSEDED):
        cols["failure_reason"] = reason
        cols["finished_at"] = now
    elif new == JobState.SUCCEEDED:
        cols["finished_at"] = now
        cols["failure_reason"] = None
    elif new == JobState.PENDING:
        cols["finished_at"] = None
    cols.update(values or {})
    # The state before, for the event row; the UPDATE below is what decides.
    before = session.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
    hit = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(sorted(exp)))
        .values(**cols)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if hit is None:
        where = "does not exist" if before is None else f"is {before}"
        raise TransitionError(f"job {job_id} {where}, expected one of {sorted(exp)} to move it to {new}")
    session.add(JobEvent(job_id=job_id, at=now, from_state=before, to_state=new, message=reason))
    log.info("job %d -> %s%s", job_id, new, f": {reason}" if reason else "")


def transition_delivery(
    session: Session,
    delivery_id: int,
    expected: Iterable[DeliveryState],
    new: DeliveryState,
    *,
    values: Mapping[str, Any] | None = None,
) -> None:
    """Move delivery ``delivery_id`` from one of ``expected`` to ``new`` with one conditional UPDATE.

    Raises
    ------
    TransitionError
        If the delivery is in none of the ``expected`` states.
    """
    from storage.models import Delivery

    exp = frozenset(expected)
    bad = [s for s in exp if new not in ALLOWED_DELIVERY_TRANSITIONS[s]]
    if bad or not exp:
        raise ValueError(f"delivery transition {sorted(bad)} -> {new} is not allowed")
    cols: dict[str, Any] = {"state": new, "updated_at": utcnow()}
    cols.update(values or {})
    hit = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state.in_(sorted(exp)))
        .values(**cols)
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if hit is None:
        raise TransitionError(f"delivery {delivery_id} is not in {sorted(exp)}; cannot move it to {new}")
