"""The NVMe controller's queues as device state (:mod:`vfio_user_devices.nvme`, docs/state.md).

The rule: a state is saved between commands. :meth:`NvmeController.quiesce
<vfio_user_devices.nvme.NvmeController.quiesce>` stops the worker from starting a batch and
the doorbells from running commands inline, and waits for the batch in progress: every command
fetched from a submission queue is then completed (its completion posted, its interrupt
signalled). Commands the host submitted that were not fetched yet stay in guest memory: the
SQ tail in the state is ahead of its head, and the loading controller fetches them. Held
Asynchronous Event Requests (their CIDs), events waiting for one and completions of held
commands not posted yet are carried.

Queues are lists of integers, one per queue, in the controller's order (the worker's round
robin follows it)::

    SQ: [qid, base, size, cqid, head, tail]
    CQ: [qid, base, size, iv, ien, head, tail, phase, [sqid, ...]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vfio_user_server.errors import StateError

from .nvme_admin import AERL, MQES
from .nvme_queues import CompletionQueue, HeldPost, SubmissionQueue
from .nvme_spec import AQA_WRITABLE, CC_WRITABLE, PAGE_SIZE

if TYPE_CHECKING:
    from .nvme import NvmeController

__all__ = ["check_queue_state", "check_state", "queue_state", "set_queue_state"]

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


def queue_state(ctrl: NvmeController) -> dict[str, Any]:
    """The queues, held AERs, pending events and held completions (lock held)."""
    sqs = [[sq.qid, sq.base, sq.size, sq.cqid, sq.head, sq.tail]
                             for sq in ctrl.sqs.values()]
    cqs = [[cq.qid, cq.base, cq.size, cq.iv, cq.ien, cq.head, cq.tail,
                              cq.phase, sorted(cq.sqids)] for cq in ctrl.cqs.values()]
    posts = [list(post) for post in ctrl.held_posts]
    return {"sqs": sqs, "cqs": cqs, "held_aers": list(ctrl.held_aers),
            "pending_events": list(ctrl.pending_events), "held_posts": posts}


def _ints(item: Any, n: int, what: str) -> list[int]:
    if (not isinstance(item, list) or len(item) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
        raise StateError(f"nvme: {what} is not a list of {n} integers")
    return item


def check_queue_state(ctrl: NvmeController, value: Any) -> None:
    """StateError unless ``value`` is a queue state this controller can take."""
    if not isinstance(value, dict) or set(value) != {"sqs", "cqs", "held_aers",
                                                     "pending_events", "held_posts"}:
        raise StateError("nvme: the queue state does not have the expected parts")
    cqs = value["cqs"]
    sqs = value["sqs"]
    if not isinstance(cqs, list) or not isinstance(sqs, list):
        raise StateError("nvme: queues must be lists")
    cq_ids: dict[int, set[int]] = {}
    for item in cqs:
        if not isinstance(item, list) or len(item) != 9:
            raise StateError("nvme: a CQ is not [qid, base, size, iv, ien, head, tail, phase, "
                             "sqids]")
        sqids = item[8]
        qid, base, size, iv, head, tail, phase = _ints(item[:4] + item[5:8], 7, "a CQ")
        if not isinstance(item[4], bool):
            raise StateError("nvme: a CQ's ien is not a bool")
        _check_queue("CQ", ctrl, qid, base, size, head, tail, cq_ids)
        if not 0 <= iv < ctrl.msix_vectors or phase not in (0, 1):
            raise StateError(f"nvme: CQ {qid} vector {iv} or phase {phase} out of range")
        cq_ids[qid] = set(_ints(sqids, len(sqids) if isinstance(sqids, list) else -1,
                                f"CQ {qid}'s SQ list"))
    sq_ids: dict[int, set[int]] = {}
    for item in sqs:
        qid, base, size, cqid, head, tail = _ints(item, 6, "an SQ")
        _check_queue("SQ", ctrl, qid, base, size, head, tail, sq_ids)
        if cqid not in cq_ids or qid not in cq_ids[cqid]:
            raise StateError(f"nvme: SQ {qid} completes to CQ {cqid}, which is not there or "
                             "does not list it")
        sq_ids[qid] = set()
    for qid, listed in cq_ids.items():
        if not listed <= set(sq_ids):
            raise StateError(f"nvme: CQ {qid} lists SQs that are not there")
    if (0 in sq_ids) != (0 in cq_ids):
        raise StateError("nvme: the admin SQ and CQ go together")
    aers = _ints(value["held_aers"], len(value["held_aers"])
                 if isinstance(value["held_aers"], list) else -1, "held_aers")
    if len(aers) > AERL + 1 or any(not 0 <= cid <= 0xFFFF for cid in aers):
        raise StateError("nvme: held AER CIDs out of range")
    events = value["pending_events"]
    events = _ints(events, len(events) if isinstance(events, list) else -1, "pending_events")
    maxlen = ctrl.pending_events.maxlen or 0
    if len(events) > maxlen or any(not 0 <= e <= _U32 for e in events):
        raise StateError("nvme: pending events out of range")
    posts = value["held_posts"]
    if not isinstance(posts, list):
        raise StateError("nvme: held_posts is not a list")
    for post in posts:
        cqid, sqid, cid, status, dw0 = _ints(post, 5, "a held completion")
        if (not 0 <= cqid <= ctrl.max_queues or not 0 <= sqid <= ctrl.max_queues
                or not 0 <= cid <= 0xFFFF or not 0 <= status <= 0x7FFF
                or not 0 <= dw0 <= _U32):
            raise StateError("nvme: a held completion is out of range")


def _check_queue(kind: str, ctrl: NvmeController, qid: int, base: int, size: int, head: int,
                 tail: int, seen: Mapping[int, object]) -> None:
    if not 0 <= qid <= ctrl.max_queues or qid in seen:
        raise StateError(f"nvme: {kind} id {qid} out of range or repeated")
    if not 2 <= size <= MQES + 1 or not 0 <= base <= _U64:
        raise StateError(f"nvme: {kind} {qid} size {size} or base {base:#x} out of range")
    if not (0 <= head < size and 0 <= tail < size):
        raise StateError(f"nvme: {kind} {qid} head {head} / tail {tail} beyond its size")


def set_queue_state(ctrl: NvmeController, value: Any) -> None:
    """Replace the queues and the held work (lock held; :func:`check_queue_state` first)."""
    check_queue_state(ctrl, value)
    assert isinstance(value, dict)
    cqs: dict[int, CompletionQueue] = {}
    for item in value["cqs"]:
        qid, base, size, iv, ien, head, tail, phase, sqids = item
        cq = CompletionQueue(qid, base, size, iv, ien)
        cq.head, cq.tail, cq.phase = head, tail, phase
        cq.sqids = set(sqids)
        cqs[qid] = cq
    sqs: dict[int, SubmissionQueue] = {}
    for item in value["sqs"]:
        qid, base, size, cqid, head, tail = item
        sq = SubmissionQueue(qid, base, size, cqid)
        sq.head, sq.tail = head, tail
        sqs[qid] = sq
    posts: list[HeldPost] = [(p[0], p[1], p[2], p[3], p[4]) for p in value["held_posts"]]
    ctrl.cqs, ctrl.sqs = cqs, sqs
    ctrl.held_aers = list(value["held_aers"])
    ctrl.pending_events.clear()
    ctrl.pending_events.extend(value["pending_events"])
    ctrl.held_posts = posts


def check_state(ctrl: NvmeController, fields: Mapping[str, Any]) -> None:
    """StateError unless ``fields`` (the controller's state fields) fit this controller."""
    for name in ("blocks", "max_queues"):
        if fields[name] != getattr(ctrl, name):
            raise StateError(f"nvme: the state's {name} is {fields[name]}, this "
                             f"controller's {getattr(ctrl, name)}")
    for name, limit in (("cc", CC_WRITABLE), ("csts", 0xFFFFFFFF), ("aqa", AQA_WRITABLE),
                        ("asq", (1 << 64) - PAGE_SIZE), ("acq", (1 << 64) - PAGE_SIZE),
                        ("intms", 0xFFFFFFFF), ("power_cycles", (1 << 64) - 1)):
        value = fields[name]
        if not isinstance(value, int) or value < 0 or value & ~limit:
            raise StateError(f"nvme: {name} {value!r} out of range")
    for name in ("io_sq_limit", "io_cq_limit"):
        value = fields[name]
        if not isinstance(value, int) or not 1 <= value <= ctrl.max_queues:
            raise StateError(f"nvme: {name} {value!r} out of range")
    for name in ("features", "vector_config", "stats"):
        table = fields[name]
        if not isinstance(table, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64
                for v in table.values()):
            raise StateError(f"nvme: {name} is not a table of integers")
    if set(fields["features"]) != set(ctrl.features):
        raise StateError("nvme: the state's features are not this controller's")
    if set(fields["stats"]) != set(ctrl.stats):
        raise StateError("nvme: the state's SMART counters are not this controller's")
    thresholds = fields["temperature_thresholds"]
    if not isinstance(thresholds, list) or not all(
            isinstance(t, list) and len(t) == 3
            and all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in t)
            for t in thresholds):
        raise StateError("nvme: temperature thresholds are not [selector, type, value]")
    if not isinstance(fields["serial"], str) or not 0 < len(fields["serial"]) <= 20:
        raise StateError("nvme: the serial number is 1 to 20 characters")
    check_queue_state(ctrl, fields["queue_state"])
