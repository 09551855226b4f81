"""A running gateway's table replaced in place (hot reload, issue 7): route rules at
association time and for queries, and [[remote_access]] for other sites' queries."""

from __future__ import annotations

from pathlib import Path

from dicombridge import config as site_config
from dicombridge.acceptance import RejectReason
from tests.cryptokit import Federation
from tests.test_metrics import fed, gateway_for

__all__ = ["fed"]  # the fixture, imported for pytest


def test_apply_table_swaps_rules_and_remote_access(tmp_path: Path, fed: Federation) -> None:
    """Before the edit hosp-b may not query here and RESEARCH is not served; after
    apply_table, hosp-b's [[remote_access]] entry is the responder's policy, RESEARCH
    admits callers matching CT* only at association, and a query through it reaches the
    first route whose calling AE holds; nothing needed a restart."""
    gateway = gateway_for(tmp_path, fed, nodes={"PACS": 104})
    assert gateway.responder.policy.entry("hosp-b") is None
    policy = gateway.acceptance_policy()
    assert policy.decide("RESEARCH", "CT01") is RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED

    path = gateway.site.config.source
    path.write_text(
        path.read_text() + '\n[[routes]]\nae_title = "RESEARCH"\nsites = ["hosp-b", "hosp-c"]\n'
        'calling_ae_titles = ["CT*"]\nmatch = {Modality = "CT"}\n'
        '\n[[routes]]\nae_title = "RESEARCH"\nsite = "hosp-c"\ncalling_ae_titles = ["CT0?"]\n'
        '\n[[remote_access]]\nsite = "hosp-b"\noperations = ["echo", "find"]\n'
    )
    restart = gateway.apply_table(site_config.load(path))

    assert restart == []
    entry = gateway.responder.policy.entry("hosp-b")
    assert entry is not None
    assert entry.operations == ["echo", "find"]
    policy = gateway.acceptance_policy()
    assert policy.decide("RESEARCH", "CT_ROOM1") is None
    assert policy.decide("RESEARCH", "WS1") is RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    query_route = gateway.requester.route("RESEARCH", "CT01")
    assert query_route is not None
    assert query_route.destinations == ("hosp-b", "hosp-c")
