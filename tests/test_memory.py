"""Memory stays bounded: a 400 MB instance is sealed, spooled and assembled in a child process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIZE_BYTES = 400 * 1000 * 1000
BLOCK_BYTES = 8 * 1024 * 1024
PEAK_LIMIT_BYTES = 120 * 1000 * 1000
# Streaming holds a few fragments at a time: growth past the import baseline was ~6 MB when
# measured; 40 MB still catches anything that buffers a tenth of the file.
GROWTH_LIMIT_BYTES = 40 * 1000 * 1000

# Runs in a fresh interpreter so that VmHWM (peak resident set) measures only this work:
# imports, keys and directory, seal_file, spooling every fragment, assemble.
CHILD = """
import json, sys
from pathlib import Path

def vm_hwm_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

from tests.cryptokit import make_federation
from dicombridge.spool import Spool

root, source = Path(sys.argv[1]), Path(sys.argv[2])
fed = make_federation()
baseline = vm_hwm_bytes()
transfer = fed.seal(source, root / "outbox", fragment_size=1024 * 1024)
after_seal = vm_hwm_bytes()
spool = Spool(root / "spool")
spool.put("hosp-a", transfer.manifest_body())
for _, body in transfer.fragment_bodies():
    spool.put("hosp-a", body)
after_spool = vm_hwm_bytes()
spool.assemble(
    "hosp-a",
    transfer.transfer_id,
    root / "instance.dcm",
    site_id="hosp-b",
    keys=fed.keys["hosp-b"],
    directory=fed.directory,
)
print(json.dumps({
    "baseline": baseline,
    "after_seal": after_seal,
    "after_spool": after_spool,
    "peak": vm_hwm_bytes(),
    "fragments": transfer.fragment_count,
}))
"""


def _write_big_file(path: Path, size: int) -> str:
    """Write ``size`` bytes in 8 MiB blocks, each block distinct; return the SHA-256."""
    pattern = os.urandom(BLOCK_BYTES)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for offset in range(0, size, BLOCK_BYTES):
            block = (offset // BLOCK_BYTES).to_bytes(8, "big") + pattern[8:]
            block = block[: size - offset]
            digest.update(block)
            handle.write(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(BLOCK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_400_mb_instance_round_trip_in_bounded_memory(tmp_path: Path) -> None:
    """Sealing, spooling and assembling 400 MB peaks below 120 MB resident, bytes intact."""
    source = tmp_path / "big.dcm"
    expected = _write_big_file(source, SIZE_BYTES)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(source)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    mb = {name: round(value / 1e6, 1) for name, value in figures.items() if name != "fragments"}
    print(f"VmHWM (MB) for a {SIZE_BYTES / 1e6:.0f} MB instance: {mb}")
    assert figures["fragments"] == -(-SIZE_BYTES // (1024 * 1024))
    assert _sha256(tmp_path / "instance.dcm") == expected
    assert figures["peak"] < PEAK_LIMIT_BYTES, mb
    assert figures["peak"] - figures["baseline"] < GROWTH_LIMIT_BYTES, mb
