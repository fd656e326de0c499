"""Integrity checks of the vmem allocator: slots, page groups, sharing, prefix keys, tiers."""

from __future__ import annotations

from kvmem.backends.vmem.state import VMemState
from kvmem.errors import IntegrityError

__all__ = ["check_backend", "check_seqs"]


def check_backend(a: VMemState) -> None:
    """Verify slots, page groups and their counts, held totals, and the safety rules.

    Every reserved token is mapped; a page shared between slots lies
    inside the reserved KV of live sequences only, and at most one of
    them may write into it (the others copy it first, in ``reserve``).
    """
    with a._lock:
        a._mapper.settle()
        a.space.check()
        if a._prefix is not None:
            a._prefix.check(
                [len(g) for g in a.space.groups],
                [None if o is None else o.num_computed for o in a._owner],
            )
        check_seqs(a)
    if a._tiers is not None:
        a._tiers.check_integrity()


def check_seqs(a: VMemState) -> None:
    """(Lock held.) Each sequence against its slot, and the slot and held totals."""
    sp = a.space
    held = 0
    owned: set[int] = set()
    writers: set[int] = set()
    a._check_host()
    for sid, s in a._seqs.items():
        if s.swapped and s.transfer is None:
            if s.slot >= 0 or s.held:
                raise IntegrityError(f"{sid!r}: swapped out but holds a slot or pages")
            continue
        if s.held != sp.pages(s.reserved):
            raise IntegrityError(f"{sid!r}: held groups out of date")
        held += s.held
        if s.slot < 0:
            if s.reserved:
                raise IntegrityError(f"{sid!r}: reserved KV but no slot")
            continue
        if a._owner[s.slot] is not s or s.slot in owned:
            raise IntegrityError(f"{sid!r}: slot {s.slot} owned by another sequence")
        owned.add(s.slot)
        lst = sp.groups[s.slot]
        if sp.covered[s.slot] < s.reserved:
            raise IntegrityError(f"{sid!r}: reserved tokens are not all mapped")
        if any(sp.ref[g] > 1 for g in lst[s.held :]):
            raise IntegrityError(f"{sid!r}: a shared page lies beyond its reservation")
        for j in sp.shared_pages(s.slot, s.num_computed, s.reserved):
            if lst[j] in writers:
                raise IntegrityError(f"{sid!r}: writes into a page another sequence writes")
            writers.add(lst[j])
    if held != a._held_sum:
        raise IntegrityError("held group total is off")
    if a._held() > sp.num_groups:
        raise IntegrityError("more groups held than pooled")
    for slot, owner in enumerate(a._owner):
        if owner is None:
            if slot not in a._quarantine and any(sp.ref[g] > 1 for g in sp.groups[slot]):
                raise IntegrityError(f"free slot {slot} maps pages shared with a sequence")
        elif slot not in owned:
            raise IntegrityError(f"slot {slot} is owned by an unregistered sequence")
    rest = set(a._free_slots) | a._quarantine
    if owned & rest or len(owned) + len(rest) != a.max_seqs:
        raise IntegrityError("slots leaked")
