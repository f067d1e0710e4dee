"""Link shaping in a spec: the MTU, bandwidth, delay, jitter and loss of underlay links.

A node's link inherits underlay.link. bandwidth, delay, jitter and loss take a bare number (in Mbit, ms, %)
or a string with a unit; the messages say which units exist and catch the usual slip of bytes for bits.
`lab link` reads its options with the same rules (`link_option`), so "50ms" means the same in both places.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from topo.model import DEFAULT_MTU, LinkSpec
from topo.schema import Issues, Loc, Source, StrictModel, short, show, wrong_type

MTU_MIN = 576  # the smallest datagram every IPv4 host must accept (RFC 791)
MTU_MAX = 9000  # a common jumbo-frame size

BANDWIDTH_MAX_MBIT = 100_000.0  # 100 Gbit/s: far above what a veth pair carries
DELAY_MAX_MS = 60_000.0  # a minute: anything longer only makes every TCP connection time out


class LinkIn(StrictModel):
    """An underlay link. bandwidth, delay and loss take a number or a string with a unit, so they are read
    as Any here and checked by `_quantity`, which says which units exist (pydantic's union errors would not)."""

    mtu: int | None = None
    bandwidth: Any = None
    delay: Any = None
    loss: Any = None
    jitter: Any = None


@dataclass(frozen=True)
class _Unit:
    """How one link property is written: a bare number counts in `suffix`, a string carries one of `units`."""

    field: str
    suffix: str  # what a bare number means, e.g. Mbit
    units: dict[str, float]  # lower-case unit -> factor to `suffix`
    shown: str  # the units, for messages
    example: str
    maximum: float  # in `suffix`
    maximum_text: str
    absent: str  # what leaving the field out means


_BANDWIDTH = _Unit("bandwidth", "Mbit",
                   {"kbit": 1e-3, "kbps": 1e-3, "mbit": 1.0, "mbps": 1.0, "gbit": 1e3, "gbps": 1e3}, "kbit, Mbit or Gbit", "100Mbit", BANDWIDTH_MAX_MBIT, "100Gbit", "an unshaped link")
_DELAY = _Unit("delay", "ms", {"us": 1e-3, "usec": 1e-3, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3},
               "us, ms or s", "10ms", DELAY_MAX_MS, "60s", "no added delay")
_LOSS = _Unit("loss", "%", {"%": 1.0}, "%", "1%", 100.0, "100%", "no loss")
_JITTER = _Unit("jitter", "ms", _DELAY.units, _DELAY.shown, "5ms", DELAY_MAX_MS, "60s", "a constant delay")
_QUANTITY_TEXT = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S*)\s*", re.ASCII)
_QUANTITY_MAX_TEXT = 40  # "100Mbit" needs far less; longer text is refused before any regex runs
# Byte units (MB, KiB/s, MBps): the capital B, or a spelled-out byte, is what tells them from bits.
_BYTES_UNIT = re.compile(r"([kmg])(i?)(b|bytes?)(/s|ps)?", re.IGNORECASE | re.ASCII)


def check_link(link_in: LinkIn | None, loc: Loc, issues: Issues, default: LinkSpec | None = None
               ) -> LinkSpec | None:
    """A link's MTU and shaping. delay, jitter and loss need the kernel's netem, which `lab up` checks, not the
    spec. `default` is what a node's link inherits (underlay.link)."""
    if link_in is None:
        return LinkSpec()
    before = len(issues)
    if link_in.mtu is not None and not MTU_MIN <= link_in.mtu <= MTU_MAX:
        issues.add(loc + ("mtu",), f"mtu {show(link_in.mtu)} is out of range: use {MTU_MIN}..{MTU_MAX} "
                                   f"({DEFAULT_MTU} is Ethernet's usual size)")
    bandwidth = _quantity(link_in.bandwidth, _BANDWIDTH, loc + ("bandwidth",), issues)
    delay = _quantity(link_in.delay, _DELAY, loc + ("delay",), issues)
    loss = _quantity(link_in.loss, _LOSS, loc + ("loss",), issues)
    jitter = _quantity(link_in.jitter, _JITTER, loc + ("jitter",), issues)
    if jitter is not None and delay is None and (default is None or default.delay_ms is None):
        # netem varies a delay by up to the jitter (tc's `delay 50ms 5ms`): there is nothing to vary without one
        issues.add(loc + ("jitter",), f"jitter needs a delay to vary: add delay (e.g. delay: 50ms, jitter: "
                                      f"{_shown_quantity(link_in.jitter, _JITTER, None)}), or remove jitter")
    if len(issues) > before:
        return None
    return LinkSpec(mtu=link_in.mtu, bandwidth_mbit=bandwidth, delay_ms=delay, loss_percent=loss, jitter_ms=jitter)


def link_option(name: str, value: str) -> float:
    """A `lab link` option (delay, jitter or loss) read exactly as the spec's link field of that name (so
    "50ms", "250us", "1%" and a bare 50 mean the same in both); a bad value raises SpecError naming it."""
    issues = Issues(Source())
    given: str | float = value
    try:
        given = float(value)  # a bare number on the command line is what a YAML number is in the spec
    except ValueError:
        pass
    number = _quantity(given, {"delay": _DELAY, "jitter": _JITTER, "loss": _LOSS}[name], (name,), issues)
    issues.raise_if_any("lab link")
    assert number is not None
    return number


def _quantity(value: Any, unit: _Unit, loc: Loc, issues: Issues) -> float | None:
    """A number in unit.suffix, or a string with a unit, as a float in unit.suffix; None if absent or wrong."""
    if value is None:
        return None
    raw = issues.source.raw.get(loc)
    number, problem = _read_quantity(value, unit, raw)
    if problem is None and number is not None:
        shown = _shown_quantity(value, unit, raw)
        if not number > 0:
            problem = f"{unit.field} {shown} must be more than 0: leave {unit.field} out for {unit.absent}"
        elif number > unit.maximum:
            problem = f"{unit.field} {shown} is more than {unit.maximum_text}: use at most {unit.maximum_text}"
    if problem is not None:
        issues.add(loc, problem)
        return None
    return number


def _shown_quantity(value: float | str, unit: _Unit, raw: str | None) -> str:
    """The value as written: a string as it is, a bare number with the unit it implies (10 -> 10Mbit)."""
    if isinstance(value, str):
        return short(value, 40)
    if not math.isfinite(value):
        return short(raw or str(value), 40)
    return f"{_num(value)}{unit.suffix}"


def _read_quantity(value: Any, unit: _Unit, raw: str | None) -> tuple[float | None, str | None]:
    expected = f"a number ({unit.suffix}) or a string with a unit ({unit.shown}), e.g. {unit.example}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, wrong_type(expected, value, raw)
    if not isinstance(value, str):
        return (None, f"must be {expected}, got {value}") if math.isnan(value) else (float(value), None)
    match = _QUANTITY_TEXT.fullmatch(value) if len(value) <= _QUANTITY_MAX_TEXT else None
    if match is None:
        return None, f"{short(repr(value), 40)} is not a {unit.field}: write {expected}"
    number, suffix = float(match[1]), match[2]
    if unit is _BANDWIDTH:
        problem = _bytes_problem(number, suffix, value)
        if problem:
            return None, problem
    factor = unit.units.get(suffix.lower())
    if factor is not None:
        return number * factor, None
    if suffix == "":
        return None, (f"{short(repr(value), 40)} has no unit: write {match[1]}{unit.suffix}, or the number "
                      f"{match[1]} without quotes")
    return None, (f"unknown unit {short(repr(suffix), 20)} in {short(repr(value), 40)}: use {unit.shown}, "
                  f"e.g. {unit.example}")


def _bytes_problem(number: float, suffix: str, value: str) -> str | None:
    """tc and link speeds count bits; a size unit in bytes is the usual slip (10MB meant as 10 Mbit/s).
    kbps/mbps/gbps count bits here, as on network gear (tc would read them as bytes); MBps stays bytes."""
    match = _BYTES_UNIT.fullmatch(suffix)
    if match is None or (suffix.lower() in _BANDWIDTH.units and "B" not in suffix):
        return None
    prefix = {"k": "k", "m": "M", "g": "G"}[match[1].lower()]
    binary = (1.024 ** "kmg".index(match[1].lower()) * 1.024) if match[2] else 1.0
    return (f"{short(repr(value), 40)} is in bytes, but bandwidth counts bits: write "
            f"{_num(number * 8 * binary)}{prefix}bit (a byte is 8 bits)")


def _num(value: float) -> str:
    """A number for a message: 10, not 10.0; 0.5 as it is."""
    return str(int(value)) if math.isfinite(value) and value == int(value) and abs(value) < 1e15 else f"{value:g}"
