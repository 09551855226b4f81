"""What the fault-injection suite needs around a sandbox: a modality, counters, checks.

A case sends a study from a DCMTK ``storescu`` (the modality) to site A's route to site
B, breaks something mid-transfer, repairs it, and waits until the promise holds or its
deadline passes:

- every instance A answered with success is in B's PACS with the same data set bytes;
- B's PACS received no instance twice (its ``received.log`` counts every C-STORE,
  repeats included: an Orthanc that ignores re-stored instances cannot hide them);
- outbox, spool, incoming, quarantine and owed receipts are empty at both sites.

Figures for the report come from the gateways' logs (appended across restarts): re-sends,
retries, duplicates dropped, instances in doubt found stored.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from dicombridge import config as site_config
from dicombridge.orthanc import OrthancServer
from dicombridge.receipts import owed_receipts
from dicombridge.sandbox import Sandbox
from tests.pacskit import DCMTK_BIN, dcmtk_env, sop_instance_uid, wait_for
from tests.relaykit import dataset_sha256, file_chunks, orthanc_file_dataset_sha256

SENDER: Final = "site-a"
RECEIVER: Final = "site-b"
ROUTE_TO_B: Final = "SITE_B"
STUDY_SIZE: Final = 200
COMPLETION_DEADLINE_S: Final = 300.0

_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


class StoreRun:
    """DCMTK's storescu sending files to a gateway; its output parsed as it arrives."""

    def __init__(self, port: int, called_ae_title: str, files: list[Path]) -> None:
        self.files = files
        self.attempted: list[Path] = []
        self.answered: list[Path] = []  # answered with success
        self.refused: list[tuple[Path, str]] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [
                str(DCMTK_BIN / "storescu"),
                "-v",
                "-aet",
                "MODALITY",
                "-aec",
                called_ae_title,
                "-xe",  # the files' own transfer syntax first: sent unchanged
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dcmtk_env(),
        )
        self._reader = threading.Thread(target=self._read, name="storescu-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as output:
            self._parse(output)

    def _parse(self, output: IO[str]) -> None:
        current: Path | None = None
        for line in output:
            if sending := _SENDING.search(line):
                current = Path(sending.group(1).strip())
                with self._lock:
                    self.attempted.append(current)
            elif (response := _RESPONSE.search(line)) and current is not None:
                with self._lock:
                    if response.group(1).startswith("Success"):
                        self.answered.append(current)
                    else:
                        self.refused.append((current, response.group(1)))
                current = None

    @property
    def answered_count(self) -> int:
        with self._lock:
            return len(self.answered)

    def wait(self, *, timeout_s: float = 300.0) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def never_attempted(self) -> list[Path]:
        with self._lock:
            attempted = set(self.attempted)
        return [path for path in self.files if path not in attempted]


def storage_root(sandbox: Sandbox, site_id: str) -> Path:
    return site_config.load(sandbox.config_path(site_id)).storage.root


def leftovers(root: Path) -> dict[str, int]:
    """What a site still holds of unfinished work, by area (all zero when done)."""

    def count(pattern: str) -> int:
        return sum(1 for path in root.glob(pattern) if not path.name.startswith("."))

    return {
        "outbox": count("outbox/*"),
        "spool": count("spool/*/*"),
        "incoming": count("incoming/*.json"),
        "quarantine": count("quarantine/*/*"),
        "receipts": owed_receipts(root / "receipts"),
    }


@dataclass
class LogMark:
    """A gateway log from a given offset on (the log outlives restarts)."""

    path: Path
    offset: int = 0

    @classmethod
    def now(cls, path: Path) -> LogMark:
        return cls(path, path.stat().st_size if path.exists() else 0)

    def lines(self) -> list[str]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            return handle.read().decode(errors="replace").splitlines()

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines() if text in line)

    def transfer_ids(self, text: str) -> list[str]:
        """The transfer_id of each line containing ``text`` (a JSON line, as a gateway
        logs to a file, or a text line: ``transfer_id=...``)."""
        found = []
        for line in self.lines():
            match = re.search(r'transfer_id(?:=|": ")([0-9a-f]+)', line)
            if text in line and match:
                found.append(match.group(1))
        return found


@dataclass
class CaseResult:
    """One case's figures, as reported in the suite's summary and faults.json."""

    case: str
    answered: int
    time_to_completion_s: float
    duplicates_dropped: int
    resends: int
    retries: int
    in_doubt_found_stored: int
    stores_at_pacs: int
    notes: dict[str, Any] = field(default_factory=dict)


class Case:
    """One fault case over a running sandbox: send, break, repair, check, measure."""

    def __init__(self, name: str, sandbox: Sandbox, study: list[Path]) -> None:
        self.name = name
        self.sandbox = sandbox
        self.study = study
        self.uids = {path: sop_instance_uid(path) for path in study}
        self.case_uids = set(self.uids.values())
        self.log_a = LogMark.now(Path(sandbox.site(SENDER)["gateway"]["log"]))
        self.log_b = LogMark.now(Path(sandbox.site(RECEIVER)["gateway"]["log"]))
        self.runs: list[StoreRun] = []
        self.fault_at = 0.0
        for site in (SENDER, RECEIVER):
            held = leftovers(storage_root(sandbox, site))
            assert not any(held.values()), f"{site} not clean before {name}: {held}"

    @property
    def pacs_b(self) -> OrthancServer:
        return self.sandbox.pacs(RECEIVER)

    def send(self, files: list[Path] | None = None) -> StoreRun:
        gateway = self.sandbox.site(SENDER)["gateway"]
        run = StoreRun(int(gateway["port"]), ROUTE_TO_B, files or self.study)
        self.runs.append(run)
        return run

    def received_at_b(self) -> int:
        """C-STOREs of this case's instances that B's PACS received (repeats included)."""
        return sum(1 for uid in self.pacs_b.received() if uid in self.case_uids)

    def wait_mid_transfer(self, condition: Callable[[], bool], what: str) -> None:
        wait_for(condition, timeout_s=120, what=f"{what} ({self.name})")
        self.fault_at = time.monotonic()

    def answered(self) -> list[Path]:
        return [path for run in self.runs for path in run.answered]

    def finish(self) -> CaseResult:
        """Wait until every answered instance is stored at B and nothing is left over;
        check bytes and duplicates; return the figures."""
        for run in self.runs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(timeout_s=COMPLETION_DEADLINE_S)
        answered = self.answered()
        assert answered, f"{self.name}: the gateway answered no instance with success"
        wanted = {self.uids[path] for path in answered}
        roots = [storage_root(self.sandbox, site) for site in (SENDER, RECEIVER)]

        def done() -> bool:
            stored = set(self.pacs_b.received()) & self.case_uids
            return wanted <= stored and not any(
                count for root in roots for count in leftovers(root).values()
            )

        try:
            wait_for(
                done,
                timeout_s=COMPLETION_DEADLINE_S,
                interval_s=0.2,
                what=f"{self.name} to complete",
            )
        except AssertionError as exc:
            missing = wanted - set(self.pacs_b.received())
            raise AssertionError(
                f"{exc}: {len(missing)} answered instances missing at B; "
                f"left over: {[leftovers(root) for root in roots]}"
            ) from exc
        elapsed = time.monotonic() - self.fault_at
        counts = Counter(uid for uid in self.pacs_b.received() if uid in self.case_uids)
        twice = {uid: n for uid, n in counts.items() if n > 1}
        assert not twice, f"{self.name}: stored more than once at B: {twice}"
        self._check_bytes(answered)
        published = self.log_a.transfer_ids("transfer published")
        return CaseResult(
            case=self.name,
            answered=len(answered),
            time_to_completion_s=round(elapsed, 1),
            duplicates_dropped=len(set(self.log_b.transfer_ids("duplicate dropped"))),
            resends=len(published) - len(set(published)),
            retries=self.log_a.count("retrying") + self.log_b.count("retrying"),
            in_doubt_found_stored=self.log_b.count("instance in doubt already in the local node"),
            stores_at_pacs=sum(counts.values()),
        )

    def _check_bytes(self, answered: list[Path]) -> None:
        pacs = self.pacs_b
        with pacs.client() as client:
            for path in answered:
                orthanc_id = client.find_instance(self.uids[path])
                assert orthanc_id is not None, f"{path.name} not in B's PACS"
                sent, _ = dataset_sha256(file_chunks(path))
                stored, _ = orthanc_file_dataset_sha256(pacs.rest_url, orthanc_id)
                assert stored == sent, f"{path.name}: B's PACS holds other bytes"
