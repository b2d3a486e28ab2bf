"""Leases with expiry kept on the MLflow tracking server: one holder of a resource at a time across
processes, pods and machines that share nothing but that server (or one ``sqlite:///`` file).

MLflow has no compare-and-swap, but it hands out model version numbers atomically: a new version
of a registered model gets ``max(all versions, deleted ones included) + 1`` in one transaction and
``(name, version)`` is the primary key, so concurrent creates never share a number (the store
retries the loser). So the tickets of resource R of model M are the versions of an internal
registered model ``M.lease.R``:

- ``acquire`` takes a ticket; the lease belongs to the lowest ticket that is neither released nor
  revoked and whose heartbeat is fresh. Later tickets poll (first come, first served).
- A heartbeat is ``update_model_version``: the server stamps ``last_updated_timestamp`` with its
  own clock and returns it, which tells the caller the server's time, so freshness is always
  judged on the server's clock, never by comparing two machines' clocks.
- A waiter may revoke (a tag) a ticket whose heartbeat is older than its ttl, or at once a ticket
  whose holder is known dead: its owner process (a ``lesionflow run`` driver, a ``corrections
  add``) and the last process that took it up both ran on this host and are gone (SIGKILL, OOM). Released and revoked
  tickets stay dead: no tag is ever removed and no version deleted, so a number is never reused
  (no ABA). The waiter re-reads the revoked ticket *after* tagging it and still waits until that
  heartbeat + ttl, in case a renewal landed just before the tag.
- A holder counts its lease valid until (monotonic time it *sent* its last renewal) + ttl, and
  only after reading that renewal back unrevoked. The server stamped the renewal later than it was
  sent, so the holder's validity ends before any waiter may take over; a renewal that lands after
  a revoke reads the revoke back in the same response, and the holder learns it lost (fencing).

``ticket`` numbers grow with every new holder: a fencing token to store next to guarded writes.
The lease models show up in the registry UI; never delete their versions by hand (a deleted ticket
counts as released, even while its holder is still at work).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lesionflow.errors import LeaseHeldError, LeaseLostError

log = logging.getLogger(__name__)

_TAG = "lesionflow.lease."
TAG_HOLDER = _TAG + "holder"
TAG_HOLDER_ID = _TAG + "holder_id"  # a hash: filter strings cannot quote arbitrary holder text
TAG_TTL_MS = _TAG + "ttl_ms"
TAG_PROCESS = _TAG + "process"  # the last process that took the ticket up (see process_identity)
TAG_OWNER = _TAG + "owner"  # the process whose death ends the holder, if one outlives its steps
TAG_HELD_SINCE = _TAG + "held_since"
TAG_RELEASED = _TAG + "released"
TAG_REVOKED_BY = _TAG + "revoked_by"
TAG_FLOOR = _TAG + "floor"  # on the registered model: every ticket below it is dead (saves reads)
SOURCE = "lesionflow-lease:/"  # not a local path, so an HTTP server accepts it without a run
HEARTBEAT = "lesionflow lease ticket: the server's last_updated_timestamp is its heartbeat"
OWNER_ENV = "LESIONFLOW_LEASE_OWNER"  # set by `lesionflow run` for the steps it starts


def process_identity(pid: int | None = None) -> str:
    """``host pid N started T``: the start time tells a live process from a later one that reused
    its pid."""
    process = psutil.Process(pid)
    return f"{socket.gethostname()} pid {process.pid} started {process.create_time():.3f}"


def _dead(identity: str | None) -> bool:
    """True only when ``identity`` names a process of this host that no longer runs; a process
    on another host (or an identity without a start time) cannot be checked, so it is not dead."""
    parts = (identity or "").split()
    if len(parts) != 5 or parts[0] != socket.gethostname() or parts[1] != "pid":
        return False
    try:
        process = psutil.Process(int(parts[2]))
        return (abs(process.create_time() - float(parts[4])) > 0.01
                or process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def model_name(name: str, resource: str) -> str:
    return f"{name}.lease.{resource}"


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease, since when, and when it expires unless renewed (server times, UTC)."""

    name: str
    resource: str
    holder: str
    ticket: int
    since: datetime
    expires: datetime

    def __str__(self) -> str:
        return (f"{self.holder} (ticket {self.ticket}) since {_iso(self.since)}, expiring at "
                f"{_iso(self.expires)} unless renewed")


@dataclass(frozen=True)
class _Ticket:
    number: int
    holder: str
    holder_id: str
    ttl_ms: int
    created: int  # server milliseconds
    heartbeat: int  # server milliseconds
    tags: dict = field(repr=False)

    @property
    def expires(self) -> int:
        return self.heartbeat + self.ttl_ms

    @property
    def released(self) -> bool:
        return TAG_RELEASED in self.tags

    @property
    def revoked_by(self) -> str | None:
        return self.tags.get(TAG_REVOKED_BY)

    @property
    def holder_dead(self) -> bool:
        """Its owner process and the last process that took it up are both gone from this host."""
        return TAG_OWNER in self.tags and _dead(self.tags[TAG_OWNER]) and _dead(self.tags.get(TAG_PROCESS))

    def info(self, name: str, resource: str) -> LeaseInfo:
        since = int(self.tags.get(TAG_HELD_SINCE, self.created))
        return LeaseInfo(name, resource, self.holder, self.number, _time(since), _time(self.expires))


class Lease:
    """A lease this process holds (from ``acquire``); ``ticket`` is its fencing token."""

    def __init__(self, client: MlflowClient, name: str, resource: str, holder: str, ticket: int,
                 ttl: float, valid_until: float) -> None:
        self.name, self.resource, self.holder, self.ticket, self.ttl = name, resource, holder, ticket, ttl
        self._client, self._model = client, model_name(name, resource)
        self._valid_until = valid_until  # time.monotonic() scale
        self._lock = threading.Lock()  # the heartbeat thread and the caller share the lease
        self._lost: LeaseLostError | None = None
        self.took_over: list[str] = []  # holders whose dead or expired tickets this acquire revoked

    def renew(self) -> None:
        """Extend the lease to ttl from now. LeaseLostError if it was released or taken over.

        A lease that expired but that nobody took over is renewed: its ticket is still the lowest
        live one, so nobody can have held the resource in between."""
        with self._lock:
            if self._lost:
                raise self._lost
            sent = time.monotonic()
            self._confirm(self._client.update_model_version(self._model, str(self.ticket), HEARTBEAT))
            self._valid_until = sent + self.ttl

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is still ours for a while: call it right before
        committing work done under the lease."""
        with self._lock:
            if self._lost:
                raise self._lost
            if time.monotonic() > self._valid_until:
                self._lose(f"it was not renewed within its ttl of {self.ttl:g}s, so another holder "
                           "may take it over at any moment")
            self._confirm(self._client.get_model_version(self._model, str(self.ticket)))

    def release(self) -> None:
        """Give the lease up (idempotent); the next waiter takes over at its next poll."""
        with self._lock:
            _set_tag(self._client, self._model, self.ticket, TAG_RELEASED, _now_iso())

    def _confirm(self, version) -> None:
        ticket = _ticket(version)
        if ticket.revoked_by:
            self._lose(f"it expired and ticket {ticket.revoked_by} took it over")
        if ticket.released:
            self._lose("it was released")

    def _lose(self, why: str) -> None:
        self._lost = LeaseLostError(
            f"lost the {self.resource!r} lease of {self.name} (holder {self.holder}, ticket "
            f"{self.ticket}): {why}. Work done under it must not be committed; start again.")
        raise self._lost


def acquire(name: str, resource: str, holder: str, *, ttl: float, wait: float = 0,
            owner: str | None = None) -> Lease:
    """Take the lease of ``resource`` of model ``name`` for ``holder``, waiting up to ``wait``
    seconds for the current holder (LeaseHeldError after that). ``ttl``: seconds the lease lasts
    without renewal (a crashed holder blocks others that long).

    Re-entrant: a holder with a live ticket (e.g. taken by an earlier pipeline step, in another
    process, with ``held(..., release=False)``) gets that ticket back. LeaseLostError if the
    holder's newest ticket was taken over since: what it did under the lease may be stale.
    ``owner`` (default: ``$LESIONFLOW_LEASE_OWNER``) is the process whose death ends the holder."""
    if ttl <= 0 or wait < 0:
        raise ValueError(f"lease ttl must be > 0 and wait >= 0 (got ttl={ttl}, wait={wait})")
    client = MlflowClient()
    model = model_name(name, resource)
    floor = _ensure_model(client, model)
    number, created = _own_ticket(client, name, resource, holder, ttl, owner or os.environ.get(OWNER_ENV))
    try:
        return _wait_for_turn(client, name, resource, holder, number, floor, ttl, wait)
    except BaseException:  # LeaseHeldError, Ctrl-C while waiting, a server error
        if created:  # a new ticket left behind would hold up everyone after it until it expired
            with suppress(Exception):
                _set_tag(client, model, number, TAG_RELEASED, _now_iso())
        raise


def _wait_for_turn(client: MlflowClient, name: str, resource: str, holder: str, number: int,
                   floor: int, ttl: float, wait: float) -> Lease:
    model = model_name(name, resource)
    deadline = time.monotonic() + wait
    took_over: list[str] = []
    while True:
        sent = time.monotonic()
        mine = _ticket(client.update_model_version(model, str(number), HEARTBEAT))
        if mine.revoked_by or mine.released:  # only if this process stalled > ttl while waiting
            raise LeaseLostError(f"the {resource!r} lease of {name}: ticket {number} of {holder} was "
                                 "given up or revoked while it waited; try again")
        blocking = _blocking(client, model, floor, mine, took_over)
        if not blocking:
            if TAG_HELD_SINCE not in mine.tags:
                _set_tag(client, model, number, TAG_HELD_SINCE, str(mine.heartbeat))
            if number > floor:  # all lower tickets are dead for good: later readers skip them
                client.set_registered_model_tag(model, TAG_FLOOR, str(number))
            lease = Lease(client, name, resource, holder, number, ttl, valid_until=sent + ttl)
            lease.took_over = took_over
            return lease
        if time.monotonic() >= deadline:
            raise LeaseHeldError(
                f"the {resource!r} lease of {name} is held by {blocking[0].info(name, resource)}"
                f"{f' (waited {wait:g}s)' if wait else ''}. Retry once it is released; if that "
                "holder died, the lease frees itself when it expires.")
        time.sleep(max(0.0, min(ttl / 4, 1.0, deadline - time.monotonic())))


@contextmanager
def held(name: str, resource: str, holder: str, *, ttl: float, wait: float = 0,
         release: bool = True, owner: str | None = None) -> Iterator[Lease]:
    """Hold the lease for the block: a daemon thread renews it every ttl/3. On leaving the block
    the lease is checked (LeaseLostError if it was lost meanwhile) and released, unless
    ``release=False`` leaves it to a later step that re-acquires with the same holder."""
    lease = acquire(name, resource, holder, ttl=ttl, wait=wait, owner=owner)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, stop), daemon=True,
                            name=f"lease-{name}-{resource}")
    beat.start()
    completed = False
    try:
        yield lease
        completed = True
    finally:
        stop.set()
        beat.join()
        try:
            if completed:
                lease.check()
        finally:
            if release and completed:
                lease.release()
            elif release:
                with suppress(Exception):  # keep the block's own error (the server may be down)
                    lease.release()


def current(name: str, resource: str) -> LeaseInfo | None:
    """Who holds the lease, or None. Advisory and read-only, so it has no server time to compare
    with: it judges expiry by this machine's clock (``acquire`` uses the server's)."""
    client = MlflowClient()
    model = model_name(name, resource)
    floor = _floor(client, model)
    if floor is None:
        return None
    now = int(time.time() * 1000)
    for ticket in _tickets(client, model, f"version_number >= {floor}"):
        if not ticket.released and not ticket.holder_dead and now <= ticket.expires:
            return ticket.info(name, resource)
    return None


def _heartbeat(lease: Lease, stop: threading.Event) -> None:
    while not stop.wait(lease.ttl / 3):
        try:
            lease.renew()
        except LeaseLostError as e:
            log.error("%s", e)
            return
        except Exception as e:  # the server may be briefly unreachable: retry on the next beat
            log.warning("renewing the %r lease of %s failed (retrying): %s", lease.resource,
                        lease.name, e)


def _floor(client: MlflowClient, model: str) -> int | None:
    """The lowest ticket that may still be live, or None before the lease model exists."""
    try:
        return int(client.get_registered_model(model).tags.get(TAG_FLOOR, 1))
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _ensure_model(client: MlflowClient, model: str) -> int:
    """The lease's registered model (created on first use); returns its floor."""
    floor = _floor(client, model)
    if floor is not None:
        return floor
    try:
        client.create_registered_model(model, tags={"lesionflow.internal": "lease"},
                                       description="lesionflow lease tickets (see lesionflow/lease.py)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first
            raise
    return 1


def _own_ticket(client: MlflowClient, name: str, resource: str, holder: str, ttl: float,
                owner: str | None) -> tuple[int, bool]:
    """The holder's live ticket (re-entrancy, now taken up by this process), else a new one; and
    whether it is new."""
    model = model_name(name, resource)
    ours = _tickets(client, model, f"tags.`{TAG_HOLDER_ID}` = '{_holder_id(holder)}'")
    live = [t for t in ours if not t.released and not t.revoked_by]
    if live:
        _set_tag(client, model, live[0].number, TAG_PROCESS, process_identity())
        return live[0].number, False
    if ours and ours[-1].revoked_by:
        raise LeaseLostError(
            f"the {resource!r} lease of {name} held by {holder} (ticket {ours[-1].number}) expired "
            f"and ticket {ours[-1].revoked_by} took it over: what was done under it may be stale; "
            "start again with a new holder id")
    version = client.create_model_version(
        model, SOURCE + model, description=HEARTBEAT, await_creation_for=0,
        tags={TAG_HOLDER: holder, TAG_HOLDER_ID: _holder_id(holder), TAG_TTL_MS: str(round(ttl * 1000)),
              TAG_PROCESS: process_identity(), **({TAG_OWNER: owner} if owner else {})})
    return int(version.version), True


def _blocking(client: MlflowClient, model: str, floor: int, mine: _Ticket, took_over: list[str]
              ) -> list[_Ticket]:
    """Lower tickets whose holder holds or may still hold the lease; revokes expired ones and
    those of dead holders (noted in ``took_over``).

    ``mine.heartbeat`` is the server's time just before this read. Tickets of the same holder
    never block each other (re-entrancy)."""
    now, blocking = mine.heartbeat, []
    for ticket in _tickets(client, model, f"version_number >= {floor} and version_number < {mine.number}"):
        if ticket.released or ticket.holder_id == mine.holder_id:
            continue
        if ticket.holder_dead and not ticket.revoked_by:
            _set_tag(client, model, ticket.number, TAG_REVOKED_BY, str(mine.number))
            took_over.append(ticket.holder)
            continue  # nobody is left to renew it
        if now > ticket.expires and not ticket.revoked_by:
            _set_tag(client, model, ticket.number, TAG_REVOKED_BY, str(mine.number))
            # a renewal that landed before the tag extends the old holder's validity: re-read it
            ticket = _ticket(client.get_model_version(model, str(ticket.number)))
        if now <= ticket.expires:  # fresh, or revoked while its holder may still be at work
            blocking.append(ticket)
        elif ticket.revoked_by == str(mine.number) and ticket.holder not in took_over:
            took_over.append(ticket.holder)
    return blocking


def _tickets(client: MlflowClient, model: str, where: str) -> list[_Ticket]:
    found = client.search_model_versions(f"name = '{model}' and {where}")
    return sorted((_ticket(v) for v in found), key=lambda t: t.number)


def _ticket(version) -> _Ticket:
    tags = version.tags
    return _Ticket(number=int(version.version), holder=tags.get(TAG_HOLDER, "?"),
                   holder_id=tags.get(TAG_HOLDER_ID, ""), ttl_ms=int(tags.get(TAG_TTL_MS, 0)),
                   created=version.creation_timestamp, heartbeat=version.last_updated_timestamp,
                   tags=tags)


def _set_tag(client: MlflowClient, model: str, number: int, key: str, value: str) -> None:
    client.set_model_version_tag(model, str(number), key, value)


def _holder_id(holder: str) -> str:
    return hashlib.sha256(holder.encode()).hexdigest()[:32]


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _now_iso() -> str:
    return _iso(datetime.now(UTC))
