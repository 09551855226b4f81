"""What the benchmarks share: the workloads, the sender, and how arrival and the cost of a
process are measured.

- ``ct_series``: a 200-instance CT series, 512 x 512, 16 bit (~0.5 MB each), random
  pixel data (nothing on the way compresses anyway);
- ``big_instance``: one 1 GiB multi-frame instance;
- ``send``: DCMTK's storescu (``/usr/bin``, TCP_NODELAY) sending files on one association;
- ``Arrival``: polls an Orthanc's instance count (REST) until a number of new instances
  is there, and records when the first and the last arrived;
- ``ProcessCost``: peak RSS (VmHWM, reset through ``/proc/PID/clear_refs``) and CPU
  seconds of a running process over a span.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
from tests import relaykit

from dicombridge.orthanc import OrthancServer

CT_SERIES_SIZE: Final = 200
CT_ROWS: Final = 512
BIG_FRAMES: Final = 2048  # 2048 frames of 512 x 512 x 16 bit: 1 GiB of Pixel Data
STORESCU: Final = "/usr/bin/storescu"
POLL_S: Final = 0.02


def ct_series(directory: Path, count: int = CT_SERIES_SIZE) -> list[Path]:
    """``count`` CT images of one new series (one new study), 512 x 512, 16 bit."""
    return relaykit.ct_series(directory, count, rows=CT_ROWS, columns=CT_ROWS)


def big_instance(path: Path) -> list[Path]:
    """One 1 GiB multi-frame instance (its own study)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    relaykit.big_multiframe(path, frames=BIG_FRAMES)
    return [path]


def total_bytes(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def send(
    paths: Sequence[Path],
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "BENCH_SCU",
    prefix: Sequence[str] = (),
    timeout_s: float = 1800,
) -> subprocess.CompletedProcess[str]:
    """storescu: every file on one association, with the largest PDU storescu offers;
    ``prefix`` runs it elsewhere (``ip netns exec NS``). Raises if it fails."""
    result = subprocess.run(
        [
            *prefix,
            STORESCU,
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            "-pdu",
            "131072",
            host,
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {result.stderr[-2000:]}")
    return result


@dataclass
class Arrival:
    """When ``expected`` new instances had arrived in ``pacs`` (counted from the moment
    the object was made), in seconds since ``started``."""

    pacs: OrthancServer
    expected: int
    baseline: int = -1
    started: float = 0.0
    first_s: float | None = None
    last_s: float | None = None

    def __post_init__(self) -> None:
        self._client = self.pacs.client()
        self.baseline = self._count()

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _count(self) -> int:
        return int(self._client.statistics()["CountInstances"])

    def wait(self, *, timeout_s: float = 1800) -> None:
        """Poll until every expected instance is there (raises after ``timeout_s``)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            arrived = self._count() - self.baseline
            now = time.perf_counter() - self.started
            if arrived > 0 and self.first_s is None:
                self.first_s = now
            if arrived >= self.expected:
                self.last_s = now
                self._client.close()
                return
            if time.perf_counter() > deadline:
                self._client.close()
                raise TimeoutError(f"{arrived} of {self.expected} instances after {timeout_s}s")
            time.sleep(POLL_S)


class ProcessCost:
    """Peak RSS and CPU seconds (user and system) of process ``pid`` between ``start()``
    and ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.user_s = 0.0
        self.system_s = 0.0
        self.peak_rss_mb = 0.0
        self._start = (0.0, 0.0)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    def _times(self) -> tuple[float, float]:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / ticks, int(fields[12]) / ticks  # utime, stime

    def start(self) -> None:
        # "5" resets the peak resident set size (VmHWM) to the current one.
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self._start = self._times()

    def stop(self) -> None:
        user, system = self._times()
        self.user_s, self.system_s = user - self._start[0], system - self._start[1]
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_mb = int(line.split()[1]) / 1024
