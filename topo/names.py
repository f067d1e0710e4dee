"""Names: what a spec may call things, and the short kernel names derived from them.

Every name that reaches a kernel object or a command comes from a spec, and the tool runs as root, so
names are checked against strict patterns before anything uses them. Kernel interface names are limited
to 15 characters, so, like real CNIs, the lab derives short unique names from hashes.
"""
from __future__ import annotations

import hashlib
import re

# Kubernetes' DNS-1123 label: what object names, namespaces and node names must match.
# Matched in full (fullmatch): `$` would also accept a name ending in a newline.
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)
DNS1123_LABEL_MAX = 63
# Lab names are shorter: they appear inside every namespace name of the lab.
LAB_NAME_MAX = 40
IFNAMSIZ = 15  # usable characters of a Linux interface name

# Everything the lab creates at machine level starts with this, so `lab clean` can find it.
NETNS_PREFIX = "klab_"
# The namespace name's separator cannot appear in a DNS-1123 label, so names never collide.
SEP = "_"


def is_dns_label(value: str, max_len: int = DNS1123_LABEL_MAX) -> bool:
    return len(value) <= max_len and DNS1123_LABEL.fullmatch(value) is not None


def dns_label_problem(value: object, max_len: int = DNS1123_LABEL_MAX) -> str | None:
    """Why `value` is not a valid name, or None. The message tells the fix."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if value == "":
        return "must not be empty"
    if len(value) > max_len:
        return f"{value!r} is {len(value)} characters; at most {max_len} are allowed"
    if DNS1123_LABEL.fullmatch(value) is None:
        return (f"{value!r} is not a valid name: use lower-case letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def shown(value: str) -> str:
    """A name as the user typed it, for an error message: as it is when it is one printable word, else
    quoted as Python shows strings. A name copied with its trailing newline (`lab exec "$(cat f)"`) or a
    space would otherwise split the one-line message the CLI prints, or vanish from it when empty."""
    return value if value.isprintable() and value and not any(c.isspace() for c in value) else repr(value)


def short_hash(*parts: str, length: int = 8) -> str:
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return digest[:length]


def lab_tag(lab: str) -> str:
    """Six hex digits that stand for the lab wherever its full name does not fit."""
    return short_hash("lab", lab, length=6)


def node_netns(lab: str, node: str) -> str:
    return f"{NETNS_PREFIX}{lab}{SEP}n{SEP}{node}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"{NETNS_PREFIX}{lab}{SEP}p{SEP}{namespace}{SEP}{pod}"


def underlay_netns(lab: str, segment: str = "ul") -> str:
    return f"{NETNS_PREFIX}{lab}{SEP}u{SEP}{segment}"


def lab_of_netns(name: str) -> str | None:
    """The lab a namespace belongs to, from its name alone (for crash-safe cleanup)."""
    if not name.startswith(NETNS_PREFIX):
        return None
    rest = name[len(NETNS_PREFIX):]
    lab, sep, _ = rest.partition(SEP)
    return lab if sep and is_dns_label(lab, LAB_NAME_MAX) else None


def sandbox_id(lab: str, namespace: str, pod: str) -> str:
    """The pod sandbox id the lab hands CNI as CNI_CONTAINERID (dots cannot occur in the parts)."""
    return f"{lab}.{namespace}.{pod}"


def host_veth(container_id: str, ifname: str = "eth0", prefix: str = "veth") -> str:
    """Node-side veth name: 'veth' (Cilium's profile: 'lxc', as Cilium names them) + 8 hex digits of the
    sandbox id, well under 15 characters.

    Derived from the container id (as real CNI plugins derive theirs), so it is stable across ADD
    retries, CHECK finds the link again, and a new sandbox never reuses an old one's name.
    """
    name = prefix + short_hash("sandbox", container_id, ifname, length=8)
    assert len(name) <= IFNAMSIZ
    return name
