"""Route rules: which route, and so which sites, an instance or a query takes.

A route in ``gateway.toml`` names a called AE title on this gateway and one or more remote
sites (fan-out). It may also carry conditions:

- ``calling_ae_titles``: the modality's AE title must match one of these patterns;
- ``source_networks``: the modality's address must be in one of these networks;
- ``match``: dataset attributes by keyword (``Modality = ["CT", "MR"]``,
  ``StudyDescription = "*HEAD*"``); every attribute named must match one of its patterns.

Order of evaluation (what ``dicombridge routes check --explain`` shows):

1. Only routes whose ``ae_title`` is the association's Called AE Title are considered,
   in the order they appear in ``gateway.toml``.
2. The first of them whose conditions all hold is taken; later ones are not looked at.
3. The instance goes to every site of that route (each gets its own sealed transfer), and
   the modality is answered success only once all of them are in the outbox.
4. If none holds, the C-STORE is answered 0x0110 (processing failure) with an Error
   Comment, and nothing is relayed.

At association time a caller (AE title and address) that no route of the called AE title
could take is rejected "calling AE title not recognised" (PS3.8 Table 9-21, reason 3),
before anything is sent. Queries, retrieves and deep echoes have no data set: they take
the first route of the called AE title whose ``calling_ae_titles`` hold, ignoring
``match`` (and ``source_networks``: the association was admitted by them already).

Patterns use DICOM's wildcards (PS3.4 C.2.2.2.4): ``*`` any run of characters, ``?`` any
single one; matching is case-sensitive, as DICOM's is. A pattern is compared with the
attribute's whole value and, for a multi-valued attribute (``ImageType``), with each value.
An attribute the data set does not have, or has empty, matches ``*`` only.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

if TYPE_CHECKING:
    from dicombridge.config import RouteEntry

# Values that cannot usefully be matched as text: sequences and bulk data.
_UNMATCHABLE_VRS: Final = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def check_keyword(keyword: str) -> str:
    """A data element keyword of the DICOM dictionary whose value can be matched as text."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword (write it as PS3.6 does: Modality)")
    if set(dictionary_VR(tag).split(" or ")) & _UNMATCHABLE_VRS:  # PixelData: "OB or OW"
        raise ValueError(f"{keyword} holds a sequence or bulk data; match a text attribute")
    return keyword


def check_pattern(pattern: str) -> str:
    """A pattern: printable characters, no backslash (it separates DICOM values)."""
    if "\\" in pattern or any(ord(char) < 0x20 for char in pattern):
        raise ValueError(f"pattern {pattern!r} may not hold a backslash or control character")
    if len(pattern) > 1024:
        raise ValueError("a pattern has at most 1024 characters")
    return pattern


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def wildcard_match(pattern: str, value: str) -> bool:
    """True if ``value`` matches ``pattern`` with DICOM's ``*`` and ``?`` wildcards."""
    return _compiled(pattern).fullmatch(value) is not None


def _values(value: str | Sequence[str] | None) -> list[str]:
    """What a pattern is compared with: the whole value, then each of several values."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    joined = "\\".join(value)
    return [joined, *value] if joined else []


def attribute_matches(patterns: Sequence[str], value: str | Sequence[str] | None) -> bool:
    """True if any of ``patterns`` matches the attribute's value (absent: ``*`` only)."""
    candidates = _values(value)
    if not candidates:
        return "*" in patterns
    return any(wildcard_match(p, v) for p in patterns for v in candidates)


Attributes = Mapping[str, str | Sequence[str] | None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_in(networks: Sequence[Network], address: str) -> bool:
    """True if ``address`` (an IPv4 or IPv6 address, IPv4-mapped included) is in one of
    ``networks``; an address that does not parse is in none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


@dataclass(frozen=True)
class Admission:
    """Whom one route admits at association time: calling AE title patterns and source
    networks (None: any)."""

    calling: tuple[str, ...] | None = None
    networks: tuple[Network, ...] | None = None

    def admits(self, calling_ae_title: str, address: str | None) -> bool:
        if self.calling is not None and not attribute_matches(self.calling, calling_ae_title):
            return False
        return self.networks is None or (address is not None and address_in(self.networks, address))


def read_attributes(source: Path | bytes, keywords: Iterable[str]) -> dict[str, str | list[str]]:
    """The named top-level attributes of a Part 10 file (or its bytes), as text.

    Reads the header only (pixel data is not loaded). Raises pydicom's errors for a
    data set it cannot read; the caller answers the C-STORE with a failure.
    """
    wanted = sorted(set(keywords))
    tags = [tag for tag in (tag_for_keyword(k) for k in wanted) if tag is not None]
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    dataset = dcmread(stream, stop_before_pixels=True, specific_tags=tags)
    found: dict[str, str | list[str]] = {}
    for keyword in wanted:
        if keyword not in dataset:
            continue
        value = dataset[keyword].value
        if value is None:
            continue
        if isinstance(value, MultiValue | list | tuple):
            found[keyword] = [str(v) for v in value]
        else:
            found[keyword] = str(value)
    return found


@dataclass(frozen=True)
class Check:
    """One condition of a route and whether it held (for ``--explain``)."""

    what: str
    patterns: tuple[str, ...]
    seen: str | list[str] | None
    held: bool


@dataclass(frozen=True)
class Step:
    """One route looked at, in order: its conditions and whether it was taken."""

    position: int
    route: RouteEntry
    checks: tuple[Check, ...]

    @property
    def taken(self) -> bool:
        return all(check.held for check in self.checks)


@dataclass(frozen=True)
class Selection:
    """The route taken for an instance (None: no route holds) and how it was found."""

    route: RouteEntry | None
    position: int | None
    steps: tuple[Step, ...] = field(default=())

    @property
    def sites(self) -> tuple[str, ...]:
        return () if self.route is None else self.route.destinations


class RouteRules:
    """The routes of one ``gateway.toml``, grouped by called AE title, in file order."""

    def __init__(self, routes: Sequence[RouteEntry]) -> None:
        self._routes: dict[str, list[tuple[int, RouteEntry]]] = {}
        for position, route in enumerate(routes, start=1):
            self._routes.setdefault(route.ae_title, []).append((position, route))

    @property
    def ae_titles(self) -> list[str]:
        """Every called AE title a route serves, in order of first appearance."""
        return list(self._routes)

    def admissions(self, called_ae_title: str) -> tuple[Admission, ...] | None:
        """Whom the routes of ``called_ae_title`` admit at association time, one admission
        per route (None: a route admits anyone from anywhere)."""
        found: list[Admission] = []
        for _, route in self._routes.get(called_ae_title.strip(), []):
            if not route.calling_ae_titles and not route.source_networks:
                return None
            found.append(
                Admission(
                    tuple(route.calling_ae_titles) or None, tuple(route.source_networks) or None
                )
            )
        return tuple(dict.fromkeys(found))

    def keywords(self, called_ae_title: str) -> frozenset[str]:
        """The attributes the routes of ``called_ae_title`` need from a data set."""
        return frozenset(
            keyword
            for _, route in self._routes.get(called_ae_title.strip(), [])
            for keyword in route.match
        )

    def select(
        self,
        called_ae_title: str,
        calling_ae_title: str | None,
        attributes: Attributes | None = None,
        address: str | None = None,
    ) -> Selection:
        """The first route of ``called_ae_title`` whose conditions hold.

        ``attributes=None`` leaves data set conditions out (queries, retrieves, echoes);
        ``calling_ae_title=None`` leaves calling AE conditions out (``routes check``
        without ``--calling-ae``); ``address=None`` leaves source networks out (the
        association was admitted from one of its routes' networks already).
        """
        steps: list[Step] = []
        for position, route in self._routes.get(called_ae_title.strip(), []):
            checks: list[Check] = []
            if route.source_networks and address is not None:
                networks = tuple(str(n) for n in route.source_networks)
                held = address_in(route.source_networks, address)
                checks.append(Check("source address", networks, address, held))
            if route.calling_ae_titles and calling_ae_title is not None:
                calling = calling_ae_title.strip()
                patterns = tuple(route.calling_ae_titles)
                checks.append(
                    Check(
                        "calling AE title", patterns, calling, attribute_matches(patterns, calling)
                    )
                )
            if attributes is not None:
                for keyword, wanted in route.match.items():
                    patterns = (wanted,) if isinstance(wanted, str) else tuple(wanted)
                    seen = attributes.get(keyword)
                    checks.append(
                        Check(keyword, patterns, _shown(seen), attribute_matches(patterns, seen))
                    )
            step = Step(position, route, tuple(checks))
            steps.append(step)
            if step.taken:
                return Selection(route, position, tuple(steps))
        return Selection(None, None, tuple(steps))


def _shown(value: str | Sequence[str] | None) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    return list(value)


def never_reached(routes: Sequence[RouteEntry]) -> tuple[int, int] | None:
    """(earlier, later) 1-based positions of a route that can never be taken, or None.

    A later route with the same ``ae_title`` is never taken when an earlier one asks
    nothing it does not also ask: the earlier one holds whenever the later one would.
    """
    for later_index, later in enumerate(routes):
        for earlier_index in range(later_index):
            earlier = routes[earlier_index]
            if earlier.ae_title == later.ae_title and _weaker_or_equal(earlier, later):
                return earlier_index + 1, later_index + 1
    return None


def _weaker_or_equal(earlier: RouteEntry, later: RouteEntry) -> bool:
    """True if ``earlier`` holds whenever ``later`` does (its patterns, literally, are a
    superset of the later one's for every condition it has)."""
    if earlier.calling_ae_titles and not (
        later.calling_ae_titles and set(later.calling_ae_titles) <= set(earlier.calling_ae_titles)
    ):
        return False
    if earlier.source_networks and not (
        later.source_networks and set(later.source_networks) <= set(earlier.source_networks)
    ):
        return False
    return all(
        keyword in later.match and _as_set(later.match[keyword]) <= _as_set(wanted)
        for keyword, wanted in earlier.match.items()
    )


def _as_set(wanted: str | Sequence[str]) -> frozenset[str]:
    return frozenset([wanted] if isinstance(wanted, str) else wanted)
