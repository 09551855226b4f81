"""Throwaway Orthanc PACS instances for the sandbox and the tests, and a small REST reader.

``OrthancServer.start(workdir, ...)`` writes ``orthanc.json`` (storage and index inside
``workdir``), runs Debian's ``/usr/sbin/Orthanc`` with its log in ``workdir/orthanc.log``
(never in ours: Orthanc may log what it received), waits until both its REST API and its
DICOM port answer, and records what it started in ``workdir/orthanc-state.json`` so that a
later process (``sandbox down``) stops exactly that pid. ``OrthancClient`` reads what the
PACS holds over the REST API.

Configuration choices (Orthanc Book, "Configuration of Orthanc"):

- HTTP is for loopback only (``RemoteAccessAllowed`` false); authentication is off unless
  ``http_credentials`` asks for a generated user. Orthanc 1.10 cannot bind its DICOM or
  HTTP port to one address, so both listen on every interface of this host.
- Files are kept as received as far as Orthanc allows: no ``StorageCompression``, no
  ingest transcoding, every ``1.2.840.10008.1.*`` transfer syntax accepted, no plugins.
  Orthanc still rewrites the File Meta Information it stores, so the bytes of a stored
  file are compared with another Orthanc's, never with the file that was sent.
- ``DicomCheckCalledAet`` is on, so a wrong called AE title is rejected as a real PACS
  would; ``DicomModalities`` registers the nodes it may later C-STORE or C-MOVE to.
- ``MaximumPduLength`` is Orthanc's maximum (131072 bytes) for throughput.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import httpx

from dicombridge.errors import OrthancError, SandboxError

log = logging.getLogger(__name__)

ORTHANC_BINARY: Final = Path("/usr/sbin/Orthanc")
CONFIG_FILE: Final = "orthanc.json"
STATE_FILE: Final = "orthanc-state.json"
LOG_FILE: Final = "orthanc.log"
RECEIVED_LOG: Final = "received.log"
# Orthanc calls ReceivedInstanceFilter for every instance it receives, before deciding
# whether to store it (Orthanc Book, "Lua scripting", filtering incoming instances).
_COUNTING_LUA: Final = """\
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open(%s, "a")
  log:write(dicom.SOPInstanceUID .. "\\n")
  log:close()
  return true
end
"""
# Orthanc's allowed range for MaximumPduLength is [4096, 131072].
ORTHANC_MAX_PDU_BYTES: Final = 131072
_START_ATTEMPTS: Final = 3
# Processes this interpreter started, by pid: kept so that they are reaped by ``wait``
# (an abandoned ``Popen`` warns when collected) while a server object may be rebuilt
# from the state file.
_CHILDREN: Final[dict[int, subprocess.Popen[bytes]]] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice; another process may
    still take it before it is used, so starters retry on a bind failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` on this host. Reads ``/proc/net/tcp`` and
    ``tcp6`` instead of connecting, so the server logs no aborted connection."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # fields[1] is "ADDRESS:PORT" in hex, fields[3] the state; 0A is LISTEN.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


@dataclass(frozen=True)
class DicomModality:
    """A DICOM node Orthanc knows (``DicomModalities``): it may send to it and accept
    C-FIND/C-MOVE/C-GET from it."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class OrthancSettings:
    """What differs between Orthanc instances; everything else is fixed in ``render``."""

    ae_title: str = "ORTHANC"
    dicom_port: int = 0  # 0: choose a free port
    http_port: int = 0  # 0: choose a free port
    name: str = "dicombridge-pacs"
    modalities: Mapping[str, DicomModality] = field(default_factory=dict)
    # Private SOP classes too: the bridge relays whatever storage a site sends.
    unknown_sop_class_accepted: bool = True
    overwrite_instances: bool = False
    http_credentials: bool = False
    lua_scripts: Sequence[Path] = ()
    # Logs association events (AE titles, IPs; no PHI, Orthanc de-identifies its logs).
    verbose_dicom: bool = False
    dicom_scp_timeout_s: int = 30
    # Seconds without a new instance before a patient, study or series is "stable"
    # (Lua ``OnStableStudy``); Orthanc's default is 60.
    stable_age_s: int = 60
    sync_storage: bool = True
    # Append the SOP Instance UID of every C-STORE received, stored or not (an Orthanc
    # ignores an instance it holds already), to ``received.log``: duplicates show there.
    count_received: bool = False
    # The character set of Orthanc's C-FIND answers and new tags ("Latin1", "Utf8", ...).
    default_encoding: str = "Latin1"


@dataclass(frozen=True)
class OrthancServer:
    """One Orthanc process started in ``workdir``; ``stop()`` ends exactly that pid."""

    workdir: Path
    pid: int
    ae_title: str
    host: str
    dicom_port: int
    http_port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    @property
    def storage_directory(self) -> Path:
        return self.workdir / "storage"

    def received(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE received, in order, repeats included
        (with ``OrthancSettings.count_received``)."""
        try:
            text = (self.workdir / RECEIVED_LOG).read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        return text.split()

    def client(self, *, timeout_s: float = 30.0) -> OrthancClient:
        """A REST client for this server (close it, or use it as a context manager)."""
        auth = (self.username, self.password) if self.username and self.password else None
        return OrthancClient(self.rest_url, auth=auth, timeout_s=timeout_s)

    # --- lifecycle ------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path,
        settings: OrthancSettings | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> OrthancServer:
        """Start Orthanc in ``workdir`` and return once REST and DICOM both answer.

        Ports left at 0 are chosen free; if Orthanc then fails to start (a port taken in
        between), it is tried again with new ports. Raises ``SandboxError`` with the tail
        of Orthanc's log when it does not come up within ``timeout_s``.
        """
        settings = settings or OrthancSettings()
        workdir.mkdir(parents=True, exist_ok=True)
        previous = cls.from_workdir(workdir)
        if previous is not None and previous.is_running():
            raise SandboxError(f"an Orthanc (pid {previous.pid}) already runs in {workdir}")
        attempts = 1 if settings.dicom_port and settings.http_port else _START_ATTEMPTS
        error: SandboxError | None = None
        for _ in range(attempts):
            try:
                return cls._start_once(workdir, settings, timeout_s=timeout_s)
            except SandboxError as exc:
                error = exc
        assert error is not None
        raise error

    @classmethod
    def _start_once(
        cls, workdir: Path, settings: OrthancSettings, *, timeout_s: float
    ) -> OrthancServer:
        dicom_port = settings.dicom_port or free_port()
        http_port = settings.http_port or free_port()
        username = password = None
        if settings.http_credentials:
            username, password = "dicombridge", secrets.token_urlsafe(24)
        config = render(
            workdir,
            settings,
            dicom_port=dicom_port,
            http_port=http_port,
            credentials=(username, password) if username and password else None,
        )
        config_path = workdir / CONFIG_FILE
        _write_private(config_path, json.dumps(config, indent=2))
        arguments = [str(ORTHANC_BINARY), "--no-jobs"]
        if settings.verbose_dicom:
            arguments.append("--verbose-dicom")
        arguments.append(str(config_path))
        with (workdir / LOG_FILE).open("ab") as log_file:
            process = subprocess.Popen(
                arguments,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal is for us, not for it
                # Orthanc's DICOM is DCMTK's, which sets TCP_NODELAY only when asked: without
                # it every response waits ~40 ms for a delayed ACK (Nagle).
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        _CHILDREN[process.pid] = process
        server = cls(
            workdir=workdir,
            pid=process.pid,
            ae_title=settings.ae_title,
            host="127.0.0.1",
            dicom_port=dicom_port,
            http_port=http_port,
            username=username,
            password=password,
        )
        server._write_state()
        try:
            server._wait_ready(process, timeout_s=timeout_s)
        except SandboxError:
            server._terminate(process)
            raise
        log.info(
            "orthanc started",
            extra={"pid": process.pid, "dicom_port": dicom_port, "http_port": http_port},
        )
        return server

    def _wait_ready(self, process: subprocess.Popen[bytes], *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=2.0) as client:
            while True:
                code = process.poll()
                if code is not None:
                    raise SandboxError(
                        f"Orthanc exited with {code} while starting in {self.workdir}:\n"
                        f"{self.log_tail()}"
                    )
                if client.is_up() and is_listening(self.dicom_port):
                    return
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"Orthanc did not answer within {timeout_s:.0f}s in {self.workdir}:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self, *, timeout_s: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Stopping a stopped server is
        a no-op. Only the recorded pid is signalled, and only while it is our Orthanc."""
        child = _CHILDREN.pop(self.pid, None)
        if not self.is_running():
            if child is not None:
                child.wait(timeout=5)
            self._forget()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=timeout_s)
        if not _wait_gone(self.pid, 0.0 if child is not None else timeout_s):
            log.warning("orthanc ignored SIGTERM; killing it", extra={"pid": self.pid})
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if child is not None:
                child.wait(timeout=5)
            if not _wait_gone(self.pid, 5.0):
                raise SandboxError(f"Orthanc pid {self.pid} in {self.workdir} did not die")
        self._forget()
        log.info("orthanc stopped", extra={"pid": self.pid})

    def is_running(self) -> bool:
        """Whether the recorded pid is alive and is the Orthanc of this work directory."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        config_path = str(self.workdir / CONFIG_FILE).encode()
        if str(ORTHANC_BINARY).encode() not in cmdline or config_path not in cmdline:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's own log (for error messages in a test or the operator)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- state file -----------------------------------------------------------------

    @classmethod
    def from_workdir(cls, workdir: Path) -> OrthancServer | None:
        """The server recorded in ``workdir`` (running or not), or None."""
        try:
            info: dict[str, Any] = json.loads((workdir / STATE_FILE).read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SandboxError(f"{workdir / STATE_FILE} is unreadable: {exc}") from exc
        return cls(
            workdir=workdir,
            pid=int(info["pid"]),
            ae_title=str(info["ae_title"]),
            host=str(info["host"]),
            dicom_port=int(info["dicom_port"]),
            http_port=int(info["http_port"]),
            username=info.get("username"),
            password=info.get("password"),
        )

    def _write_state(self) -> None:
        state = {
            "pid": self.pid,
            "ae_title": self.ae_title,
            "host": self.host,
            "dicom_port": self.dicom_port,
            "http_port": self.http_port,
            "rest_url": self.rest_url,
            "username": self.username,
            "password": self.password,
        }
        _write_private(self.workdir / STATE_FILE, json.dumps(state, indent=2))

    def _forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / STATE_FILE).unlink()

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        _CHILDREN.pop(process.pid, None)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._forget()


def render(
    workdir: Path,
    settings: OrthancSettings,
    *,
    dicom_port: int,
    http_port: int,
    credentials: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Orthanc's configuration for ``settings`` (see the module docstring for why)."""
    storage = workdir / "storage"
    scripts = [str(path) for path in settings.lua_scripts]
    if settings.count_received:
        counting = workdir / "received.lua"
        counting.write_text(_COUNTING_LUA % json.dumps(str(workdir / RECEIVED_LOG)))
        scripts.append(str(counting))
    config: dict[str, Any] = {
        "Name": settings.name,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "Plugins": [],
        "LuaScripts": scripts,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": credentials is not None,
        "RegisteredUsers": dict([credentials]) if credentials else {},
        "HttpCompressionEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": settings.ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DefaultEncoding": settings.default_encoding,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomScpTimeout": settings.dicom_scp_timeout_s,
        "StableAge": settings.stable_age_s,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "UnknownSopClassAccepted": settings.unknown_sop_class_accepted,
        "DicomModalities": {
            name: [modality.ae_title, modality.host, modality.port]
            for name, modality in settings.modalities.items()
        },
        "OverwriteInstances": settings.overwrite_instances,
        "MaximumPduLength": ORTHANC_MAX_PDU_BYTES,
        "SaveJobs": False,
        "SyncStorageArea": settings.sync_storage,
        "DeidentifyLogs": True,
        # No "IngestTranscoding": what arrives is stored in its own transfer syntax.
    }
    return config


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only (configs may hold credentials)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` (not our child) has exited; True if it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":  # exited; its parent (not us) reaps it
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@dataclass(frozen=True)
class StoredInstance:
    """One instance as Orthanc indexes it."""

    orthanc_id: str
    sop_instance_uid: str


class OrthancClient:
    """A small reader of Orthanc's REST API; HTTP errors become ``OrthancError``."""

    def __init__(
        self, rest_url: str, *, auth: tuple[str, str] | None = None, timeout_s: float = 30.0
    ) -> None:
        self.rest_url = rest_url
        self._http = httpx.Client(base_url=rest_url, auth=auth, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def is_up(self) -> bool:
        """Whether ``GET /system`` answers."""
        try:
            return self._http.get("/system").status_code == httpx.codes.OK
        except httpx.HTTPError:
            return False

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/system")
        return result

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics``: counts of patients, studies, series, instances, disk size."""
        result: dict[str, Any] = self._json("GET", "/statistics")
        return result

    def count_instances(self) -> int:
        return int(self.statistics()["CountInstances"])

    def instances(self) -> list[str]:
        """The Orthanc ids of every stored instance."""
        result: list[str] = self._json("GET", "/instances")
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        """The Part 10 file Orthanc stored (``GET /instances/{id}/file``)."""
        return self._request("GET", f"/instances/{orthanc_id}/file").content

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags`` (holds PHI: tests only, never logged)."""
        result: dict[str, Any] = self._json("GET", f"/instances/{orthanc_id}/simplified-tags")
        return result

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, or None."""
        matches: list[dict[str, Any]] = self._json(
            "POST", "/tools/lookup", content=sop_instance_uid.encode("ascii")
        )
        for match in matches:
            if match.get("Type") == "Instance":
                return str(match["ID"])
        return None

    def file_by_uid(self, sop_instance_uid: str) -> bytes | None:
        """The stored file of the instance with this SOP Instance UID, or None."""
        orthanc_id = self.find_instance(sop_instance_uid)
        return None if orthanc_id is None else self.instance_file(orthanc_id)

    def iter_sop_instance_uids(self) -> Iterator[str]:
        """The SOP Instance UID of every stored instance (``/tools/find``, expanded)."""
        matches: list[dict[str, Any]] = self._json(
            "POST",
            "/tools/find",
            json={"Level": "Instance", "Query": {}, "Expand": True},
        )
        for match in matches:
            yield str(match["MainDicomTags"]["SOPInstanceUID"])

    def delete_instance(self, orthanc_id: str) -> None:
        self._request("DELETE", f"/instances/{orthanc_id}")

    def delete_everything(self) -> None:
        """Delete every patient, with its studies and instances (benchmarks start empty)."""
        patients: list[str] = self._json("GET", "/patients")
        for orthanc_id in patients:
            self._request("DELETE", f"/patients/{orthanc_id}")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise OrthancError(f"{method} {path}: Orthanc answered non-JSON") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise OrthancError(
                f"{method} {path}: Orthanc answered HTTP {exc.response.status_code}"
            ) from exc
        except httpx.HTTPError as exc:
            raise OrthancError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        return response
