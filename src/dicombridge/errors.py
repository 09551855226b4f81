"""The exception tree of dicombridge, in one place.

Every error the package raises on purpose derives from ``BridgeError`` and says
whether trying again may help (``transient``) or not (permanent: quarantine,
refuse, or tell the operator). Third-party errors are translated where they
enter (``raise X from exc``), never passed through.

::

    BridgeError
    ├── ConfigError                 a file an operator edits is wrong (names file, field, fix)
    │   └── DirectoryError          the federation directory is malformed
    │       ├── DirectorySignatureError   its signature does not verify
    │       └── DirectoryRollbackError    older than (or conflicting with) one accepted
    ├── KeyMaterialError            key material missing, unreadable or unknown
    ├── EnvelopeError               a message or transfer fails a check (permanent)
    │   ├── UnsupportedVersionError       protocol version this gateway cannot read
    │   ├── IntegrityError                authentication, signature or hash failed
    │   ├── NotForUsError                 sealed for another site or key
    │   └── IncompleteTransferError       a fragment is missing
    ├── SenderMismatchError         AMQP user_id missing or not the signed sender
    ├── TransportError              the broker (transient unless stated)
    │   ├── BrokerUnreachableError        cannot connect
    │   ├── BrokerTlsError                TLS to the broker failed: its certificate (permanent)
    │   ├── PublishRefusedError           nacked, returned or rejected (queue full)
    │   └── PermissionDeniedError         the broker refused an operation (permanent)
    ├── OutboxFullError             the outbox reached a cap: answer 0xA700 (transient)
    │   └── OutboxDiskFullError           its disk (or quota) has no room left
    ├── ProvisionError              provisioning through the management API failed
    ├── SandboxError                the local sandbox could not start or stop
    │   └── OrthancError                  a sandbox/test Orthanc's REST API failed
    ├── DependencyVersionError      a pinned library whose internals we hook has another version
    └── DicomServiceError           the hospital-facing DICOM service could not start

At the DICOM boundary these become DIMSE statuses, never exceptions.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every dicombridge error."""

    transient: bool = False


class ConfigError(BridgeError):
    """A configuration file is wrong; the message names the file, the field and the fix."""

    def __init__(self, path: object, field: str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {field}: {problem}. Fix: {fix}")


class DirectoryError(ConfigError):
    """The signed federation directory is malformed."""


class DirectorySignatureError(DirectoryError):
    """The directory's signature does not verify against the operator's key."""


class DirectoryRollbackError(DirectoryError):
    """The directory is older than, or conflicts with, the one already accepted."""


class KeyMaterialError(BridgeError):
    """Key material is missing, unreadable, or not in the directory."""


class EnvelopeError(BridgeError):
    """A message or transfer fails a check; never retried, quarantined."""


class UnsupportedVersionError(EnvelopeError):
    """A message names a protocol version this gateway cannot read."""


class IntegrityError(EnvelopeError):
    """Authentication tag, signature or plaintext hash does not verify."""


class NotForUsError(EnvelopeError):
    """The message is sealed for another site or for a key we do not hold."""


class IncompleteTransferError(EnvelopeError):
    """A transfer was opened with fragments missing."""


class SenderMismatchError(BridgeError):
    """The AMQP ``user_id`` is missing or is not the broker user of the signed sender."""


class TransportError(BridgeError):
    """The broker could not do what was asked; usually worth retrying."""

    transient = True


class BrokerUnreachableError(TransportError):
    """No connection to the broker."""


class BrokerTlsError(TransportError):
    """TLS to the broker failed: its certificate did not verify against the configured CA,
    its name did not match, or the TLS files could not be used. Retrying cannot help."""

    transient = False


class PublishRefusedError(TransportError):
    """A publish was nacked, returned as unroutable, or rejected by a full queue."""


class PermissionDeniedError(TransportError):
    """The broker refused an operation for lack of permission."""

    transient = False


class OutboxFullError(BridgeError):
    """The outbox reached its byte or count cap; the SCP answers 0xA700 until it drains."""

    transient = True


class OutboxDiskFullError(OutboxFullError):
    """The outbox's file system (or quota) had no room for an instance (ENOSPC, EDQUOT).

    Nothing of the instance is left in the outbox; the SCP answers 0xA700, and the same
    instance is admitted once space is freed.
    """


class ProvisionError(BridgeError):
    """Provisioning the broker through its management API failed."""


class SandboxError(BridgeError):
    """The local sandbox (broker node, PACS, gateways) could not start or stop."""


class OrthancError(SandboxError):
    """The REST API of an Orthanc started for the sandbox or tests failed or was unreachable."""


class DependencyVersionError(BridgeError):
    """A library whose internals dicombridge hooks (pynetdicom) is not the pinned version."""


class DicomServiceError(BridgeError):
    """The hospital-facing DICOM service (the SCP) could not start, e.g. its port is taken."""
