"""Benchmark over a simulated WAN: direct DIMSE A -> B (a′) against the relay (c′).

Topology (made here, as root, and removed again whatever happens); arrows point from the
end that connects to the delay proxy it connects to::

    dbwan-a (hospital A)         dbwan-c (cloud)                 dbwan-b (hospital B)
    storescu, gateway A          RabbitMQ, 127.0.0.1:5672        gateway B, Orthanc B

    10.231.1.1 --- link a-c ---> 10.231.1.2:5672 proxy 10 ms
                                 10.231.2.1:5672 proxy 10 ms <--- link c-b --- 10.231.2.2
    10.231.3.1 ---------------------- link a-b ----------------------> 10.231.3.2:104
                                                                proxy 20 ms -> 127.0.0.1:4242

Three network namespaces joined by three veth pairs. Every link is rate-limited to
100 Mbit/s by ``tc`` ``tbf`` on the egress of both of its ends; this kernel has no
``netem``, so latency comes from a delaying TCP proxy (``bench/delay_proxy.py``) at the
far end of each link, holding every chunk for the one-way delay in each direction (a
delay line, not stop-and-wait): link a-b is 40 ms round trip, links a-c and c-b are 20 ms
each. Each proxy forwards to a service on its namespace's loopback, so RabbitMQ, Orthanc
and the gateways listen on loopback only, as in the sandbox.

- a′: DCMTK ``storescu`` in A sends the series on one association straight to Orthanc B
  across link a-b; it waits a round trip per instance (C-STORE-RSP).
- c′: ``storescu`` in A sends the same kind of series to gateway A (loopback in A), which
  seals each instance into its outbox, answers, and publishes to RabbitMQ across link a-c;
  gateway B consumes across link c-b, verifies, and C-STOREs to Orthanc B (loopback in B).

Workload: ``benchkit.ct_series`` (200 CT instances, 512 x 512, 16 bit, ~0.5 MB each), a
fresh series per run; before measuring, a short warm-up series crosses each path. Figures
for a′ and c′: time until every instance is in Orthanc B and until the first is there
(``benchkit.Arrival``, polling Orthanc B's REST API from inside B), when storescu was
done, MB/s, instances/s, the ratio c′/a′ (target: at most 0.6); for c′ also peak RSS and
CPU seconds of each gateway (``benchkit.ProcessCost``), and the CPU of the broker and the
delay proxies (the machine's cores are shared by everything). Before the run, each link's
round trip (1-byte ping-pong through its proxy) and its rate each way (16 MiB) are
measured with a probe server standing in for the service, and printed.

The benchmark process stays in the root namespace: what it must reach inside one (the
probe, RabbitMQ's management API for provisioning, Orthanc B's REST API) it reaches from a
thread that moved itself into that namespace (``setns``), so only loopback and addresses
of the namespaces made here are ever connected to. Processes are started inside a
namespace with ``ip netns exec``. Needs root, ``ip``, ``tc``, DCMTK, Orthanc, RabbitMQ.

Prints a table and writes bench-results/wan.json. Run: ``.venv/bin/python bench/wan.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, Generic, TypeVar

from benchkit import Arrival, ProcessCost, ct_series, dcmtk_env, send, total_bytes

from dicombridge import config as site_config
from dicombridge.orthanc import (
    ORTHANC_BINARY,
    DicomModality,
    OrthancClient,
    OrthancServer,
    OrthancSettings,
    render,
)
from dicombridge.rabbitmq import BROKER_SCRIPTS, BrokerNode
from dicombridge.sandbox import create_federation, route_ae_title

T = TypeVar("T")

REPO: Final = Path(__file__).resolve().parents[1]
PROXY_SCRIPT: Final = Path(__file__).resolve().with_name("delay_proxy.py")
ECHOSCU: Final = "/usr/bin/echoscu"

NS_A, NS_B, NS_C = "dbwan-a", "dbwan-b", "dbwan-c"
NAMESPACES: Final = (NS_A, NS_B, NS_C)
RATE: Final = "100mbit"
RATE_MBIT: Final = 100
# tbf: a bucket of 64 KiB (a GSO segment fits), a queue of 1 MiB (~80 ms at 100 Mbit/s).
TBF_BURST: Final = "64kb"
TBF_LIMIT: Final = "1mb"

AMQP_PORT: Final = 5672  # RabbitMQ on 127.0.0.1 in the cloud namespace; proxies on its links
MGMT_PORT: Final = 15672
DIST_PORT: Final = 25672
PACS_DICOM_PORT: Final = 4242  # Orthanc B (loopback in B)
PACS_HTTP_PORT: Final = 8042
PACS_WAN_PORT: Final = 104  # Orthanc B as seen from A across link a-b (the proxy)
GATEWAY_PORT: Final = 11112  # each gateway, on loopback in its own namespace
A_ID, B_ID = "site-a", "site-b"
PACS_AE: Final = "PACS_B"
GATEWAY_A_AE, GATEWAY_B_AE = "GATEWAY_A", "GATEWAY_B"
VHOST: Final = "wan"

WARMUP_INSTANCES: Final = 4
TARGET_RATIO: Final = 0.6
RUN_TIMEOUT_S: Final = 900.0
START_TIMEOUT_S: Final = 120.0
PROBE_PINGS: Final = 25
PROBE_WARM_PINGS: Final = 5
PROBE_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class Link:
    """A veth pair between two namespaces, /30 addresses, one delay proxy at the far end."""

    name: str
    near_ns: str
    near_dev: str
    near_ip: str
    far_ns: str
    far_dev: str
    far_ip: str
    rtt_ms: float
    proxy_port: int  # the proxy listens on far_ip:proxy_port
    target_port: int  # ... and forwards to 127.0.0.1:target_port in far_ns

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2


# "near" is where the connections start: gateways connect to the broker; storescu to B.
LINK_AC: Final = Link(
    "a-c", NS_A, "dbwan-ac", "10.231.1.1", NS_C, "dbwan-ca", "10.231.1.2", 20, AMQP_PORT, AMQP_PORT
)
LINK_CB: Final = Link(
    "c-b", NS_B, "dbwan-bc", "10.231.2.2", NS_C, "dbwan-cb", "10.231.2.1", 20, AMQP_PORT, AMQP_PORT
)
LINK_AB: Final = Link(
    "a-b",
    NS_A,
    "dbwan-ab",
    "10.231.3.1",
    NS_B,
    "dbwan-ba",
    "10.231.3.2",
    40,
    PACS_WAN_PORT,
    PACS_DICOM_PORT,
)
LINKS: Final = (LINK_AC, LINK_CB, LINK_AB)


# --- running code inside a namespace --------------------------------------------------

_CLONE_NEWNET: Final = 0x40000000
_LIBC: Final = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread, and only it, into the network namespace ``name``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetnsThread(threading.Thread, Generic[T]):
    """Runs ``fn`` in a thread that first enters namespace ``ns``: every socket it (or a
    thread it starts) opens belongs to that namespace. ``outcome()`` joins it."""

    def __init__(self, ns: str, fn: Callable[[], T]) -> None:
        super().__init__(name=f"in-{ns}", daemon=True)
        self.ns, self.fn = ns, fn
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            enter_netns(self.ns)
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def outcome(self, timeout_s: float) -> T:
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"{self.name}: not done after {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


def in_netns(ns: str, fn: Callable[[], T], *, timeout_s: float) -> T:
    thread = NetnsThread(ns, fn)
    thread.start()
    return thread.outcome(timeout_s)


def netns_exec(ns: str) -> list[str]:
    """The prefix that runs a command inside ``ns`` (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", ns]


def run(command: Sequence[str], *, timeout_s: float = 30, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout_s, check=False, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


# --- everything this run started, stopped in reverse ----------------------------------


class Cleanup:
    """What this run made: namespaces, processes (by pid, ours only), the broker."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.broker_dir: Path | None = None
        self.log_files: list[IO[bytes]] = []

    def spawn(
        self, label: str, ns: str, command: Sequence[str], log: Path
    ) -> subprocess.Popen[bytes]:
        log_file = log.open("ab")
        self.log_files.append(log_file)
        process = subprocess.Popen(
            [*netns_exec(ns), *command],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C is for this script, which stops them in order
            env={**os.environ, "TCP_NODELAY": "1"},
            cwd=log.parent,
        )
        self.processes.append((label, process))
        return process

    def close(self) -> list[str]:
        """Stop everything, most dependent first; never raises; returns what went wrong."""
        problems: list[str] = []
        for label, process in reversed(self.processes):
            try:
                _terminate(process, grace_s=40 if label.startswith("gateway") else 15)
            except Exception as exc:  # keep cleaning up
                problems.append(f"{label}: {exc}")
        if self.broker_dir is not None and (self.broker_dir / "node.json").exists():
            try:
                run(
                    [
                        *netns_exec(NS_C),
                        str(BROKER_SCRIPTS / "stop-node"),
                        "--workdir",
                        str(self.broker_dir),
                        "--timeout-s",
                        "30",
                    ],
                    timeout_s=90,
                )
            except Exception as exc:
                problems.append(f"broker: {exc}")
        for ns in reversed(self.namespaces):
            # What is left in a namespace made here was started here (epmd, say).
            problems += _kill_namespace_processes(ns)
            try:
                run(["ip", "netns", "delete", ns])
            except Exception as exc:
                problems.append(f"namespace {ns}: {exc}")
        for log_file in self.log_files:
            log_file.close()
        return problems


def _terminate(process: subprocess.Popen[bytes], *, grace_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _kill_namespace_processes(ns: str) -> list[str]:
    try:
        pids = [int(p) for p in run(["ip", "netns", "pids", ns]).split()]
    except Exception as exc:
        return [f"listing processes of {ns}: {exc}"]
    pids = [pid for pid in pids if pid not in (os.getpid(), os.getppid())]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)  # other processes' exit: no event to wait on
    left = [pid for pid in pids if _alive(pid)]
    return [f"pids {left} still in {ns}"] if left else []


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- the network --------------------------------------------------------------------


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/wan.py makes network namespaces: run it as root")
    for tool in ("ip", "tc", "/usr/bin/storescu", ECHOSCU, str(ORTHANC_BINARY)):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (make deps installs DCMTK and Orthanc)")
    existing = set(run(["ip", "netns", "list"]).split())
    taken = [ns for ns in NAMESPACES if ns in existing]
    if taken:
        raise SystemExit(
            f"network namespaces {taken} exist: another run of bench/wan.py, or one killed "
            f"with SIGKILL. If none runs: ip netns delete {' '.join(taken)}"
        )


def build_network(cleanup: Cleanup) -> None:
    for ns in NAMESPACES:
        run(["ip", "netns", "add", ns])
        cleanup.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    for link in LINKS:
        # Both ends are made inside their namespaces: nothing is left in the root one.
        run(
            [
                "ip",
                "link",
                "add",
                link.near_dev,
                "netns",
                link.near_ns,
                "type",
                "veth",
                "peer",
                "name",
                link.far_dev,
                "netns",
                link.far_ns,
            ]
        )
        for ns, dev, ip in (
            (link.near_ns, link.near_dev, link.near_ip),
            (link.far_ns, link.far_dev, link.far_ip),
        ):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(
                [
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    RATE,
                    "burst",
                    TBF_BURST,
                    "limit",
                    TBF_LIMIT,
                ]
            )


def start_proxies(cleanup: Cleanup, work: Path) -> dict[str, subprocess.Popen[bytes]]:
    proxies = {}
    for link in LINKS:
        ready = work / f"proxy-{link.name}.ready"
        proxies[link.name] = cleanup.spawn(
            f"proxy {link.name}",
            link.far_ns,
            [
                sys.executable,
                str(PROXY_SCRIPT),
                "--listen",
                f"{link.far_ip}:{link.proxy_port}",
                "--target",
                f"127.0.0.1:{link.target_port}",
                "--delay-ms",
                str(link.one_way_ms),
                "--ready-file",
                str(ready),
            ],
            work / f"proxy-{link.name}.log",
        )
        _wait_for(ready.exists, proxies[link.name], f"proxy {link.name}", 15)
    return proxies


def _wait_for(
    condition: Callable[[], bool],
    process: subprocess.Popen[bytes] | None,
    what: str,
    timeout_s: float,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise RuntimeError(f"{what} exited with {process.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.1)  # another process getting ready: no event to wait on


# --- measuring the links: a probe server stands in for the service --------------------


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        data = conn.recv(min(left, 1 << 20))
        if not data:
            raise ConnectionError("probe: connection closed early")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


class ProbeServer:
    """On 127.0.0.1:``port`` in ``ns``: b"P" is echoed; b"U"+n: n bytes read, then b"K";
    b"D"+n: n bytes sent. One connection at a time, until ``stop()``."""

    def __init__(self, ns: str, port: int) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = NetnsThread(ns, lambda: self._serve(port))

    def __enter__(self) -> ProbeServer:
        self._thread.start()
        if not self._ready.wait(10):
            self._stop.set()
            self._thread.outcome(10)  # raises what went wrong
            raise TimeoutError("probe server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.outcome(10)

    def _serve(self, port: int) -> None:
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(4)
            listener.settimeout(0.2)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(60)
                    self._answer(conn)

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        zeros = bytes(1 << 18)
        while command := conn.recv(1):
            if command == b"P":
                conn.sendall(b"P")
                continue
            (size,) = struct.unpack("!Q", _recv_exact(conn, 8))
            if command == b"U":
                _recv_exact(conn, size)
                conn.sendall(b"K")
            else:
                while size:
                    size -= conn.send(zeros[: min(size, len(zeros))])


def probe_link(link: Link) -> dict[str, float]:
    """From the near end through the link's proxy: round trip, and the rate each way."""

    def measure() -> dict[str, float]:
        with socket.create_connection((link.far_ip, link.proxy_port), timeout=60) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(PROBE_WARM_PINGS + PROBE_PINGS):
                started = time.perf_counter()
                conn.sendall(b"P")
                _recv_exact(conn, 1)
                rtts.append(time.perf_counter() - started)
            rtt = statistics.median(rtts[PROBE_WARM_PINGS:])
            payload = bytes(PROBE_BYTES)
            started = time.perf_counter()
            conn.sendall(b"U" + struct.pack("!Q", PROBE_BYTES))
            conn.sendall(payload)
            _recv_exact(conn, 1)
            up_s = time.perf_counter() - started
            started = time.perf_counter()
            conn.sendall(b"D" + struct.pack("!Q", PROBE_BYTES))
            _recv_exact(conn, PROBE_BYTES)
            down_s = time.perf_counter() - started
        # Each timed transfer also holds one round trip (request, last byte, answer).
        return {
            "rtt_ms": rtt * 1000,
            "rtt_min_ms": min(rtts[PROBE_WARM_PINGS:]) * 1000,
            "near_to_far_mbit_s": PROBE_BYTES * 8 / 1e6 / (up_s - rtt),
            "far_to_near_mbit_s": PROBE_BYTES * 8 / 1e6 / (down_s - rtt),
        }

    return in_netns(link.near_ns, measure, timeout_s=120)


def measure_links() -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    with ProbeServer(NS_C, AMQP_PORT):
        figures[LINK_AC.name] = probe_link(LINK_AC)
        figures[LINK_CB.name] = probe_link(LINK_CB)
    with ProbeServer(NS_B, PACS_DICOM_PORT):
        figures[LINK_AB.name] = probe_link(LINK_AB)
    return figures


# --- the services -------------------------------------------------------------------


def echo(ns: str, port: int, called_ae: str) -> bool:
    result = subprocess.run(
        [*netns_exec(ns), ECHOSCU, "-aet", "BENCH_SCU", "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True,
        env=dcmtk_env(),
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def start_broker(cleanup: Cleanup, work: Path) -> BrokerNode:
    """RabbitMQ in the cloud namespace, by the repository's own script: it binds loopback
    (there), with its own Erlang cookie, data and logs under ``work``, and its own EPMD."""
    broker_dir = work / "broker"
    cleanup.broker_dir = broker_dir
    run(
        [
            *netns_exec(NS_C),
            str(BROKER_SCRIPTS / "start-node"),
            "--workdir",
            str(broker_dir),
            "--amqp-port",
            str(AMQP_PORT),
            "--mgmt-port",
            str(MGMT_PORT),
            "--dist-port",
            str(DIST_PORT),
            "--memory-mib",
            "1024",
            "--timeout-s",
            "90",
        ],
        timeout_s=150,
    )
    return BrokerNode.from_workdir(broker_dir)


def start_pacs(cleanup: Cleanup, work: Path) -> tuple[OrthancServer, subprocess.Popen[bytes]]:
    """Orthanc B in B, configured as the sandbox configures a site's PACS."""
    workdir = work / "orthanc-b"
    workdir.mkdir()
    settings = OrthancSettings(
        ae_title=PACS_AE,
        name="wan-site-b",
        modalities={"gateway": DicomModality(GATEWAY_B_AE, "127.0.0.1", GATEWAY_PORT)},
    )
    config = render(workdir, settings, dicom_port=PACS_DICOM_PORT, http_port=PACS_HTTP_PORT)
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = workdir / "orthanc.log"
    process = cleanup.spawn(
        "orthanc B", NS_B, [str(ORTHANC_BINARY), "--no-jobs", str(config_path)], log
    )
    pacs = OrthancServer(
        workdir=workdir,
        pid=process.pid,
        ae_title=PACS_AE,
        host="127.0.0.1",
        dicom_port=PACS_DICOM_PORT,
        http_port=PACS_HTTP_PORT,
    )

    def rest_up() -> bool:
        with OrthancClient(pacs.rest_url, timeout_s=2) as client:
            return client.is_up()

    _wait_for(
        lambda: in_netns(NS_B, rest_up, timeout_s=10) and echo(NS_B, PACS_DICOM_PORT, PACS_AE),
        process,
        "Orthanc B",
        START_TIMEOUT_S,
        log,
    )
    return pacs, process


def configure_site(
    config_path: Path,
    *,
    broker_host: str,
    gateway_ae: str,
    route_to: str | None = None,
    pacs: OrthancServer | None = None,
) -> None:
    """Point a provisioned site at its end of the broker's link, name its gateway, and
    give it a route (A) or its PACS (B)."""
    text = config_path.read_text(encoding="utf-8")
    url = site_config.load(config_path).broker.url
    wan_url = re.sub(r"@127\.0\.0\.1:", f"@{broker_host}:", url, count=1)
    if wan_url == url:
        raise RuntimeError(f"unexpected broker URL in {config_path}")
    text = text.replace(f'url = "{url}"\n', f'url = "{wan_url}"\n', 1)
    text = text.replace('ae_title = "DICOMBRIDGE"', f'ae_title = "{gateway_ae}"', 1)
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {GATEWAY_PORT}", 1)
    if route_to is not None:
        text += (
            f'\n[[routes]]\nae_title = "{route_ae_title(route_to)}"\n'
            f'site = "{route_to}"\nnode = "PACS"\n'
        )
    if pacs is not None:
        text += (
            f'\n[[local_nodes]]\nname = "PACS"\nae_title = "{pacs.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        )
    config_path.write_text(text, encoding="utf-8")
    if site_config.load(config_path).broker.url != wan_url:
        raise RuntimeError(f"{config_path}: the broker URL was not rewritten")


def start_gateway(
    cleanup: Cleanup, label: str, ns: str, config_path: Path, ae_title: str
) -> subprocess.Popen[bytes]:
    log = config_path.parent / "gateway.log"
    process = cleanup.spawn(
        label,
        ns,
        [sys.executable, "-m", "dicombridge", "gateway", "run", "--config", str(config_path)],
        log,
    )

    def ready() -> bool:
        # "gateway ready": connected to the broker, consumers and publishers started.
        text = log.read_text(errors="replace") if log.exists() else ""
        return "gateway ready" in text and echo(ns, GATEWAY_PORT, ae_title)

    _wait_for(ready, process, label, START_TIMEOUT_S, log)
    return process


# --- one measured transfer ------------------------------------------------------------


def transfer(
    paths: Sequence[Path],
    *,
    pacs: OrthancServer,
    host: str,
    port: int,
    called_ae: str,
    meters: dict[str, int] | None = None,
) -> dict[str, Any]:
    """storescu in A sends ``paths``; Orthanc B's count is polled from inside B meanwhile."""
    ready = threading.Event()

    def watch() -> Arrival:
        arrival = Arrival(pacs, expected=len(paths))
        arrival.start()
        ready.set()
        arrival.wait(timeout_s=RUN_TIMEOUT_S)
        return arrival

    costs = {name: ProcessCost(pid) for name, pid in (meters or {}).items()}
    for cost in costs.values():
        cost.start()
    watcher = NetnsThread(NS_B, watch)
    watcher.start()
    if not ready.wait(30):
        raise TimeoutError("Orthanc B's instance count could not be read")
    send(
        paths,
        host=host,
        port=port,
        called_ae=called_ae,
        prefix=netns_exec(NS_A),
        timeout_s=RUN_TIMEOUT_S,
    )
    sent_at = time.perf_counter()
    arrival = watcher.outcome(RUN_TIMEOUT_S + 30)
    for cost in costs.values():
        cost.stop()
    assert arrival.first_s is not None
    assert arrival.last_s is not None
    size = total_bytes(paths)
    result: dict[str, Any] = {
        "instances": len(paths),
        "bytes": size,
        "all_in_b_s": arrival.last_s,
        "first_in_b_s": arrival.first_s,
        "storescu_done_s": sent_at - arrival.started,
        "mb_per_s": size / 1e6 / arrival.last_s,
        "instances_per_s": len(paths) / arrival.last_s,
    }
    for name, cost in costs.items():
        result[name] = {"peak_rss_mb": cost.peak_rss_mb, "cpu_s": cost.cpu_s}
    return result


# --- the whole run --------------------------------------------------------------------


def benchmark(work: Path, cleanup: Cleanup) -> dict[str, Any]:
    build_network(cleanup)
    proxies = start_proxies(cleanup, work)
    links = measure_links()
    for name, figures in links.items():
        print(
            f"link {name}: round trip {figures['rtt_ms']:.1f} ms, "
            f"{figures['near_to_far_mbit_s']:.1f} / {figures['far_to_near_mbit_s']:.1f} Mbit/s",
            flush=True,
        )

    broker = start_broker(cleanup, work)
    pacs, _ = start_pacs(cleanup, work)
    federation = in_netns(
        NS_C,
        lambda: create_federation(
            work / "federation", broker=broker, site_ids=[A_ID, B_ID], vhost=VHOST
        ),
        timeout_s=START_TIMEOUT_S,
    )
    config_a, config_b = federation.site_configs[A_ID], federation.site_configs[B_ID]
    configure_site(config_a, broker_host=LINK_AC.far_ip, gateway_ae=GATEWAY_A_AE, route_to=B_ID)
    configure_site(config_b, broker_host=LINK_CB.far_ip, gateway_ae=GATEWAY_B_AE, pacs=pacs)
    gateway_b = start_gateway(cleanup, "gateway B", NS_B, config_b, GATEWAY_B_AE)
    gateway_a = start_gateway(cleanup, "gateway A", NS_A, config_a, GATEWAY_A_AE)
    print("broker, Orthanc B and both gateways up", flush=True)

    direct: dict[str, Any] = {
        "pacs": pacs,
        "host": LINK_AB.far_ip,
        "port": LINK_AB.proxy_port,
        "called_ae": PACS_AE,
    }
    relay: dict[str, Any] = {
        "pacs": pacs,
        "host": "127.0.0.1",  # gateway A, on loopback in A
        "port": GATEWAY_PORT,
        "called_ae": route_ae_title(B_ID),
    }
    transfer(ct_series(work / "warm-direct", WARMUP_INSTANCES), **direct)
    transfer(ct_series(work / "warm-relay", WARMUP_INSTANCES), **relay)
    series_a, series_c = ct_series(work / "series-a"), ct_series(work / "series-c")
    print(f"a′: {len(series_a)} instances, storescu A -> Orthanc B ...", flush=True)
    a_prime = transfer(series_a, **direct)
    print(f"c′: {len(series_c)} instances, storescu A -> gateway A -> ... -> B", flush=True)
    meters = {
        "gateway_a": gateway_a.pid,
        "gateway_b": gateway_b.pid,
        "broker": broker.pid,
        "proxy_a_c": proxies[LINK_AC.name].pid,
        "proxy_c_b": proxies[LINK_CB.name].pid,
    }
    c_prime = transfer(series_c, meters=meters, **relay)
    ratio = c_prime["all_in_b_s"] / a_prime["all_in_b_s"]
    return {
        "cores": os.cpu_count(),
        "links": {
            link.name: {
                "between": [link.near_ns, link.far_ns],
                "rate_mbit_s": RATE_MBIT,
                "rtt_ms_set": link.rtt_ms,
                "measured": links[link.name],
            }
            for link in LINKS
        },
        "a_prime_direct": a_prime,
        "c_prime_relay": c_prime,
        "ratio_c_over_a": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
    }


def report(results: dict[str, Any]) -> None:
    a, c = results["a_prime_direct"], results["c_prime_relay"]
    mb = a["bytes"] / 1e6
    print()
    print(
        f"Simulated WAN: {a['instances']} CT instances ({mb:.1f} MB) per run, "
        f"{results['cores']} cores, every link {RATE_MBIT} Mbit/s (tc tbf)"
    )
    print(f"{'link':<6}{'set RTT ms':>11}{'measured RTT ms':>17}   measured rate each way")
    for name, link in results["links"].items():
        m = link["measured"]
        near, far = (ns.removeprefix("dbwan-").upper() for ns in link["between"])
        print(
            f"{name:<6}{link['rtt_ms_set']:>11.0f}{m['rtt_ms']:>17.1f}   "
            f"{near}->{far} {m['near_to_far_mbit_s']:.1f} Mbit/s, "
            f"{far}->{near} {m['far_to_near_mbit_s']:.1f} Mbit/s"
        )
    print(f"{'':<34}{'all in B s':>11}{'first s':>9}{'storescu s':>11}{'MB/s':>7}{'inst/s':>8}")
    for label, row in (
        ("a′ direct storescu A->B (40 ms)", a),
        ("c′ relay A->broker->B (2x20 ms)", c),
    ):
        print(
            f"{label:<34}{row['all_in_b_s']:>11.2f}{row['first_in_b_s']:>9.2f}"
            f"{row['storescu_done_s']:>11.2f}{row['mb_per_s']:>7.2f}{row['instances_per_s']:>8.1f}"
        )
    verdict = "met" if results["target_met"] else "MISSED"
    print(
        f"c′/a′ (time until all in B) = {results['ratio_c_over_a']:.2f} "
        f"(target <= {results['target_ratio']:.2f}: {verdict})"
    )
    for name in ("gateway_a", "gateway_b"):
        cost = c[name]
        print(f"c′ {name}: peak RSS {cost['peak_rss_mb']:.0f} MB, CPU {cost['cpu_s']:.1f} s")
    others = ", ".join(
        f"{name} {c[name]['cpu_s']:.1f} s" for name in ("broker", "proxy_a_c", "proxy_c_b")
    )
    print(f"c′ CPU of the rest: {others}")
    print("(written to bench-results/wan.json)")


def show_logs(work: Path, lines: int = 25) -> None:
    """The ends of the logs of what was started (no PHI: gateways log ids and statuses,
    Orthanc de-identifies its logs), before the work directory goes."""
    logs = [
        *sorted(work.glob("proxy-*.log")),
        *sorted(work.glob("federation/sites/*/gateway.log")),
        work / "orthanc-b" / "orthanc.log",
    ]
    for log in logs:
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"---- {log.relative_to(work)} ----", *tail, sep="\n", file=sys.stderr)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def main() -> int:
    check_prerequisites()
    signal.signal(signal.SIGTERM, _on_sigterm)
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dicombridge-wan-"))
    cleanup = Cleanup()
    try:
        results = benchmark(work, cleanup)
    except Exception:
        show_logs(work)
        raise
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short (it is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = cleanup.close()
        shutil.rmtree(work, ignore_errors=True)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    (out / "wan.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
