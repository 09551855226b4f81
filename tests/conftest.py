"""Session-wide fixtures: one real RabbitMQ node per test session, started on first use."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicombridge.errors import SandboxError
from dicombridge.orthanc import OrthancServer, OrthancSettings
from dicombridge.rabbitmq import BrokerNode

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerNode]:
    """A RabbitMQ node (broker/start-node) on loopback with free ports, stopped at the end.

    A node that does not start is a test error carrying the node's log tail, never a skip.
    """
    workdir = tmp_path_factory.mktemp("rabbitmq")
    started = time.monotonic()
    try:
        node = BrokerNode.start(workdir, memory_mib=1024, timeout_s=60)
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    logger.info("RabbitMQ node %s up in %.1fs", node.node, time.monotonic() - started)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def orthanc_b(tmp_path: Path) -> Iterator[OrthancServer]:
    """Site B's PACS: an Orthanc of its own (AE title PACS_B), stopped after the test."""
    with OrthancServer.start(tmp_path / "orthanc-b", OrthancSettings(ae_title="PACS_B")) as server:
        yield server
