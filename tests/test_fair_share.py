"""The engine's fair share between competing customers (runtime/fair_share.py), on the event loop
alone: who enters at once, who waits, in which order waiters are let in, and cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from clora.runtime.fair_share import FairShare
from clora.runtime.limits import CustomerLimits, Limits


def fill(share: FairShare, customer: str, n: int) -> None:
    for _ in range(n):
        assert share.try_enter(customer)


async def test_a_customer_alone_is_not_held_to_the_budget():
    share = FairShare(budget=4)
    fill(share, "flood", 12)  # alone: only its own concurrency limit applies
    assert share.in_engine == {"flood": 12} and share.share() is None


async def test_while_another_competes_a_flood_waits_down_to_its_share_and_the_quiet_one_enters_at_once():
    share = FairShare(budget=4, window_s=60)
    fill(share, "flood", 6)
    assert share.try_enter("quiet")  # under its share (4 // 2): never waits behind the flood
    assert not share.try_enter("flood")  # over its share and the engine over budget: waits
    waiter = asyncio.create_task(share.wait_turn("flood"))
    await asyncio.sleep(0)
    for left in range(3):  # the flood drains 6 -> 3 in the engine; with quiet's 1 that is the budget
        share.leave("flood")
        await asyncio.sleep(0)
        assert not waiter.done(), f"let in with {share.in_engine} after {left + 1} left"
    share.leave("flood")  # 2 + 1 in the engine: under budget again
    await asyncio.wait_for(waiter, 1)
    assert share.in_engine == {"flood": 3, "quiet": 1} and share.total == 4


async def test_waiters_enter_fewest_in_the_engine_first():
    share = FairShare(budget=2, window_s=60)
    fill(share, "a", 2)  # alone
    assert share.try_enter("b") and share.try_enter("c")  # each under its share (1)
    order: list[str] = []

    async def wait(customer: str, tag: str) -> None:
        await share.wait_turn(customer)
        order.append(tag)

    for customer, tag in (("b", "b2"), ("a", "a3")):  # b queued first
        assert not share.try_enter(customer)
        asyncio.create_task(wait(customer, tag))
    await asyncio.sleep(0)
    for leaving in ("c", "a", "a"):  # one place frees when a is at 0: a, with the fewest, takes it
        share.leave(leaving)
        await asyncio.sleep(0)
    assert order == ["a3"]
    share.leave("a")  # a3 ends
    await asyncio.sleep(0)
    assert order == ["a3", "b2"] and share.waiting == {} and share.in_engine == {"b": 2}


async def test_customers_that_all_want_more_than_a_share_are_not_held_back_but_a_light_one_holds_them():
    share = FairShare(budget=4, window_s=60)
    for customer in ("a", "b", "c"):
        fill(share, customer, 4)  # each over its share, none using less: the batch stays full
    assert share.total == 12
    assert share.try_enter("quiet")  # a light customer enters at once
    for customer in ("a", "b", "c"):
        assert not share.try_enter(customer)  # and from now the heavy ones wait


async def test_a_cancelled_waiter_leaves_no_place_behind():
    share = FairShare(budget=1, window_s=60)
    fill(share, "a", 1)
    assert share.try_enter("b")
    assert not share.try_enter("a")
    waiter = asyncio.create_task(share.wait_turn("a"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert share.waiting == {} and share.in_engine == {"a": 1, "b": 1} and share.total == 2
    share.leave("a")
    assert share.in_engine == {"b": 1} and share.total == 1


async def test_once_the_other_customer_has_been_idle_for_the_window_the_flood_is_let_in():
    share = FairShare(budget=2, window_s=0.2)
    fill(share, "flood", 2)
    assert share.try_enter("quiet")
    share.leave("quiet")
    assert not share.try_enter("flood")  # quiet was active a moment ago
    waiter = asyncio.create_task(share.wait_turn("flood"))
    time.sleep(0.25)  # quiet idle past the window; the next leave lets the flood in
    share.leave("flood")
    await asyncio.wait_for(waiter, 1)
    assert share.in_engine == {"flood": 2}


async def test_a_slot_gives_its_place_back_when_done_whether_it_waited_or_not():
    limits = CustomerLimits(Limits(max_concurrent=0, requests_per_s=0), fair_share_requests=2)
    held = [limits.admit("flood") for _ in range(3)]
    quiet = limits.admit("quiet")
    assert all(s.entered for s in held) and quiet.entered
    late = limits.admit("flood")
    assert not late.entered
    turn = asyncio.create_task(late.wait_turn())
    await asyncio.sleep(0)
    for slot in held:
        slot.done()
    quiet.done()
    await asyncio.wait_for(turn, 1)
    late.done()
    assert limits.fair.total == 0 and limits.fair.in_engine == {} and limits.active == {}
