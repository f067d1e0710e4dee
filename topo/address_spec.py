"""IPv4 networks and addresses as a spec writes them, read for every layer (PodCIDRs, the underlay, racks,
Service CIDRs, cluster IPs, policy ipBlocks): one reader, so every layer says the same thing about the same
mistake (no prefix, host bits set, a reserved range, IPv6).
"""
from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

from topo.schema import Issues, Loc, short

def given_or_default(value: str | None, default: IPv4Network) -> str:
    return value if value is not None else str(default)


def default_note(given: object) -> str:
    return "" if given is not None else " (the default)"




# Ranges that never belong to a pod, Service or node network.
_RESERVED = (
    (IPv4Network("0.0.0.0/8"), "'this network'"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved"),
)

_CIDR_TEXT = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}/\d{1,2}", re.ASCII)  # fullmatch; ASCII: \d is 0-9
ADDRESS_TEXT = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", re.ASCII)  # use fullmatch


def parse_network(text: str, loc: Loc, example: str, issues: Issues, reserved: bool = True) -> IPv4Network | None:
    """An IPv4 network written ADDRESS/PREFIX with no host bits set (what Kubernetes' CIDR flags demand).
    `reserved` False: a range that is no lab's own (a NetworkPolicy ipBlock, 0.0.0.0/0 included)."""
    shown = short(text, 60)
    if ":" in text:
        issues.add(loc, f"{shown} is IPv6; kubenet-lab labs are IPv4 only: use a network like {example}")
        return None
    if ADDRESS_TEXT.fullmatch(text):
        issues.add(loc, f"{shown} has no prefix length: write ADDRESS/PREFIX, e.g. {example}")
        return None
    if not _CIDR_TEXT.fullmatch(text):
        issues.add(loc, f"{shown!r} is not an IPv4 network: write ADDRESS/PREFIX, e.g. {example}")
        return None
    try:
        loose = IPv4Network(text, strict=False)
    except ValueError:
        issues.add(loc, f"{shown} is not an IPv4 network (each address part is 0..255 without leading zeros, "
                        f"the prefix 0..32): write ADDRESS/PREFIX, e.g. {example}")
        return None
    if str(loose.network_address) != text.split("/")[0]:
        issues.add(loc, f"{shown} has host bits set (did you mean {loose}?)")
        return None
    for bad, what in _RESERVED if reserved else ():
        if loose.overlaps(bad):
            issues.add(loc, f"{loose} overlaps {bad} ({what} addresses): choose a private range such as "
                            f"{example}")
            return None
    return loose


def parse_address(text: str, loc: Loc, issues: Issues, prefix_from: str = "underlay.subnet",
                  example: str = "192.168.1.10") -> IPv4Address | None:
    if "/" in text and ADDRESS_TEXT.fullmatch(text.split("/")[0]):
        issues.add(loc, f"{short(text, 40)} must be an address without a prefix: write {text.split('/')[0]} "
                        f"(the prefix comes from {prefix_from})")
        return None
    try:
        if not ADDRESS_TEXT.fullmatch(text):
            raise ValueError
        return IPv4Address(text)
    except ValueError:
        issues.add(loc, f"{short(repr(text), 40)} is not an IPv4 address: write it like {example}")
        return None
