"""Test helpers for the real RabbitMQ node: start/stop it, provision sites, wait on conditions."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from dicombridge.fragments import Recipient, SealedTransfer, seal_file
from dicombridge.identity import LocalSite
from dicombridge.keys import newest_valid, utc_now
from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from dicombridge.spool import IncomingTransfer
from dicombridge.topology import Definitions, Limits, SiteAccount, build_definitions


@dataclass(frozen=True)
class Federation:
    """Sites provisioned into one vhost, with the URLs to reach the broker as each."""

    vhost: str
    admin_url: str
    accounts: dict[str, SiteAccount]
    site_urls: dict[str, str]
    definitions: Definitions

    def url(self, site: str) -> str:
        """The AMQP URL of ``site``'s broker user."""
        return self.site_urls[site]

    def user(self, site: str) -> str:
        """The broker user of ``site``."""
        return self.accounts[site].broker_user


@dataclass
class Provisioner:
    """Provisions sites into one vhost and remembers the (global) users to delete."""

    node: BrokerNode
    management: ManagementClient
    vhost: str
    users: set[str] = field(default_factory=set)

    def __call__(
        self, site_ids: Sequence[str] = ("hosp-a", "hosp-b"), *, limits: Limits | None = None
    ) -> Federation:
        """Provision ``site_ids`` (users named ``<site>@<vhost>``) and return their URLs."""
        accounts = {
            site: SiteAccount(
                site_id=site,
                broker_user=f"{site}@{self.vhost}",
                password=SecretStr(secrets.token_hex(16)),
            )
            for site in site_ids
        }
        definitions = build_definitions(
            vhost=self.vhost, accounts=list(accounts.values()), limits=limits
        )
        self.users.update(account.broker_user for account in accounts.values())
        self.management.apply(definitions)
        return Federation(
            vhost=self.vhost,
            admin_url=self.node.admin_amqp_url(self.vhost),
            accounts=accounts,
            site_urls={
                site: self.node.amqp_url(
                    user=account.broker_user, password=account.password, vhost=self.vhost
                )
                for site, account in accounts.items()
            },
            definitions=definitions,
        )

    def cleanup(self) -> None:
        """Delete the users this provisioner created."""
        for user in sorted(self.users):
            self.management.delete_user(user)
        self.users.clear()


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


def seal_for(
    sender: LocalSite, recipient_id: str, source: Path, fragment_size: int
) -> SealedTransfer:
    entry = sender.directory.site(recipient_id)
    assert entry is not None
    key = newest_valid(entry.kem_public_keys(), utc_now())
    assert key is not None
    outbox = sender.config.storage.root / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    return seal_file(
        source,
        outbox,
        sender=sender.sender,
        recipient=Recipient(recipient_id, key),
        fragment_size=fragment_size,
    )


@dataclass
class Inbox:
    """What a receiving site handed on, for the test to wait on."""

    received: list[tuple[IncomingTransfer, Path]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_transfer(self, incoming: IncomingTransfer) -> None:
        self.received.append((incoming, incoming.path))
        self.changed.set()

    async def wait_for(self, count: int, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.received) < count:
                self.changed.clear()
                await self.changed.wait()
