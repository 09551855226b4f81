"""The cap on bytes and messages in flight to the broker."""

from __future__ import annotations

import asyncio

from dicombridge.transport import ByteBudget
from tests.brokerkit import wait_until


async def blocked(budget: ByteBudget) -> bool:
    return budget.waiting == 1


async def test_budget_blocks_past_the_byte_cap_until_a_release() -> None:
    """A publish that would pass the byte cap waits until earlier ones are confirmed."""
    budget = ByteBudget(max_bytes=100, max_messages=10)
    await budget.acquire(60)
    waiter = asyncio.create_task(budget.acquire(60))
    await wait_until(lambda: blocked(budget), timeout_s=1, what="the waiter to block")
    assert not waiter.done()
    assert budget.bytes == 60
    await budget.release(60)
    await asyncio.wait_for(waiter, timeout=1)
    assert budget.bytes == 60
    assert budget.messages == 1


async def test_budget_blocks_past_the_message_cap() -> None:
    """With the message cap reached, the next publish waits even if bytes are free."""
    budget = ByteBudget(max_bytes=10**9, max_messages=2)
    await budget.acquire(1)
    await budget.acquire(1)
    waiter = asyncio.create_task(budget.acquire(1))
    await wait_until(lambda: blocked(budget), timeout_s=1, what="the waiter to block")
    assert not waiter.done()
    await budget.release(1)
    await asyncio.wait_for(waiter, timeout=1)
    assert budget.messages == 2


async def test_oversized_message_passes_alone() -> None:
    """A message larger than the whole cap is let through when nothing else is in flight."""
    budget = ByteBudget(max_bytes=10, max_messages=4)
    await asyncio.wait_for(budget.acquire(50), timeout=1)
    assert budget.bytes == 50
    waiter = asyncio.create_task(budget.acquire(1))
    await wait_until(lambda: blocked(budget), timeout_s=1, what="the waiter to block")
    assert not waiter.done()
    await budget.release(50)
    await asyncio.wait_for(waiter, timeout=1)
