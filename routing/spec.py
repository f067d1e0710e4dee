"""The routing side of a spec: the pod network's backend, BGP, and routed underlays (racks, routers, fabric).

A routed underlay puts each rack on its own L2 segment behind a top-of-rack router, the routers joined by a
fabric (a spine, or one shared segment), each rack an AS of its own (Calico's AS-per-rack model). The checks
here say whether the chosen backend can carry pod traffic between nodes over that underlay (host-gw needs one
segment; a BGP node mesh leaves the racks' routers without pod routes), and size the pods' MTU for the
backend's encapsulation.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pydantic import Field

from topo import names
from topo.cluster_spec import NODE_MASK_MAX, NodeIn, host_problem, overlap, rack_loc
from topo.link_spec import MTU_MAX, MTU_MIN
from topo.model import (BACKENDS, Bgp, CALICO_AS, DEFAULT_MTU, Fabric, IPIP_MODES, IPIP_OVERHEAD, Network, Rack,
                        SPINE_AS, Underlay, VXLAN_OVERHEAD)
from topo.address_spec import default_note, given_or_default, parse_address, parse_network
from topo.schema import Issues, Loc, StrictModel, count, short, show

# Backends that later versions may add: named so a learner who asks for one hears "not yet", not "unknown".
PLANNED_BACKENDS = ("wireguard",)
# Names learners reach for that are a CNI, not a backend: the hint names the backend that does the same.
BACKEND_HINTS = {"calico": "bgp", "flannel": "vxlan", "hostgw": "host-gw", "host-gateway": "host-gw"}

# Routed underlays. The spine and the direct fabric's segment are named like this by topo.underlay (which
# the spec layer does not import: it needs Mininet), so no router, node or rack may take these names.
SPINE_ROUTER = "spine"
FABRIC_SEGMENT = "fabric"
FABRIC_MODES = ("spine", "direct")
PEERINGS = ("mesh", "tor")
TOR_AS_BASE = SPINE_AS + 1  # rack i's router defaults to AS 65001 + i: eBGP to the spine (65000) needs distinct ASes
ASN_MAX = 2**32 - 1  # 4-byte AS numbers (RFC 6793)
ASN_HINT = "the private ranges 64512-65534 and 4200000000-4294967294 are the usual choice"


class _RouterIn(StrictModel):
    name: str | None = None
    ip: str | None = None
    as_number: int | None = Field(None, alias="asNumber")


class RackIn(StrictModel):
    name: str = Field(examples=["name: rack1"])
    subnet: str = Field(examples=["subnet: 192.168.1.0/24"])
    router: _RouterIn | None = None


class FabricIn(StrictModel):
    mode: str | None = None
    cidr: str | None = None
    spine_as_number: int | None = Field(None, alias="spineASNumber")


class _BgpIn(StrictModel):
    as_number: int | None = Field(None, alias="asNumber")
    peering: str | None = None


class NetworkIn(StrictModel):
    backend: str | None = None
    mtu: int | None = None
    bgp: _BgpIn | None = None
    ipip_mode: str | None = Field(None, alias="ipipMode")  # Calico's IPPool field name and values


# ---------------------------------------------------------------------------- racks and their routers


def check_routed(racks_in: list[RackIn], fabric_in: FabricIn | None, issues: Issues) -> Underlay | None:
    """Racks, each an L2 segment with its own subnet behind a top-of-rack router, and the fabric joining them
    (underlay.racks and underlay.fabric as written)."""
    if not racks_in:
        issues.add(("spec", "underlay", "racks"), "no racks: give at least one, e.g. racks: [{name: rack1, subnet: "
                                                  "192.168.1.0/24}], or remove racks for one flat segment")
        return None
    before = len(issues)
    fabric = _check_fabric(fabric_in or FabricIn(), len(racks_in), issues)
    racks = [rack for i, r in enumerate(racks_in) if (rack := _check_rack(r, i, issues)) is not None]
    _check_rack_names(racks_in, racks, issues)
    _check_rack_subnets(racks, fabric, fabric_in, issues)
    _check_rack_asns(racks_in, racks, fabric_in or FabricIn(), issues)
    if len(issues) > before or fabric is None or len(racks) != len(racks_in):
        return None
    return Underlay(subnet=None, racks=tuple(racks), fabric=fabric)


def _check_rack(rack_in: RackIn, index: int, issues: Issues) -> Rack | None:
    loc = rack_loc(index)
    before = len(issues)
    problem = names.dns_label_problem(rack_in.name)
    if problem:
        issues.add(loc + ("name",), problem)
    elif rack_in.name == FABRIC_SEGMENT:
        issues.add(loc + ("name",), f"rack name {FABRIC_SEGMENT} is taken by the segment of a direct fabric: "
                                    "pick another")
    example = f"192.168.{index + 1 if index < 255 else 1}.0/24"
    subnet = parse_network(rack_in.subnet, loc + ("subnet",), example, issues)
    if subnet is not None and subnet.prefixlen > NODE_MASK_MAX:
        issues.add(loc + ("subnet",), f"{subnet} leaves no room for a router and a node: use a prefix of "
                                      f"/{NODE_MASK_MAX} or shorter, e.g. {example}")
        subnet = None
    router_in = rack_in.router or _RouterIn()
    router = _router_name(rack_in, loc, issues)
    router_ip = _router_ip(router_in, rack_in.name, subnet, loc + ("router", "ip"), issues)
    # Calico's AS-per-rack model: every rack is an AS of its own, its ToR speaking eBGP upstream.
    asn = router_in.as_number if router_in.as_number is not None else TOR_AS_BASE + index
    _check_asn(asn, "asNumber", loc + ("router", "asNumber"), issues)
    if len(issues) > before or subnet is None or router_ip is None:
        return None
    return Rack(name=rack_in.name, subnet=subnet, router=router, router_ip=router_ip, asn=asn, index=index)


def _router_name(rack_in: RackIn, loc: Loc, issues: Issues) -> str:
    """The ToR's name: given, or tor-<rack>. It names a host (and its namespace) like a node's name does."""
    name = _router_name_of(rack_in)
    if rack_in.router is not None and rack_in.router.name is not None:
        problem = names.dns_label_problem(name)
        if problem:
            issues.add(loc + ("router", "name"), problem)
    elif names.is_dns_label(rack_in.name) and not names.is_dns_label(name):
        issues.add(loc + ("name",), f"the rack's router would be named {name}, which is {len(name)} characters; at "
                                    f"most {names.DNS1123_LABEL_MAX} are allowed: shorten the rack name or give "
                                    "router.name")
    return name


def _router_name_of(rack_in: RackIn) -> str:
    """The ToR's name as written: router.name, or tor-<rack>."""
    given = rack_in.router.name if rack_in.router is not None else None
    return given if given is not None else f"tor-{rack_in.name}"


def _router_ip(router_in: _RouterIn, rack: str, subnet: IPv4Network | None, loc: Loc,
               issues: Issues) -> IPv4Address | None:
    """The ToR's address in its rack, the nodes' gateway: given, or the subnet's first host."""
    if router_in.ip is None:
        return subnet.network_address + 1 if subnet is not None else None
    ip = parse_address(router_in.ip, loc, issues, "the rack's subnet")
    if ip is None or subnet is None:
        return None
    problem = host_problem(ip, subnet, f"rack {rack}'s subnet {subnet}")
    if problem:
        issues.add(loc, problem)
        return None
    return ip


def _check_asn(asn: int, key: str, loc: Loc, issues: Issues) -> bool:
    if 1 <= asn <= ASN_MAX:
        return True
    issues.add(loc, f"{key} {show(asn)} is out of range: use 1..{ASN_MAX} ({ASN_HINT})")
    return False


def _check_rack_names(racks_in: list[RackIn], racks: list[Rack], issues: Issues) -> None:
    """Rack names and router names are each unique; routers are hosts, so none may be called like the spine."""
    first: dict[str, int] = {}
    for index, rack_in in enumerate(racks_in):
        if rack_in.name in first:
            issues.add(rack_loc(index) + ("name",), f"rack name {rack_in.name} is already used by "
                                                     f"spec.underlay.racks[{first[rack_in.name]}]: give each rack "
                                                     "its own name")
        first.setdefault(rack_in.name, index)
    routers: dict[str, Rack] = {}
    for rack in racks:
        given = _router_given(racks_in, rack.index, "name")
        loc = rack_loc(rack.index) + (("router", "name") if given else ("name",))
        other = routers.get(rack.router)
        if rack.router == SPINE_ROUTER:
            issues.add(loc, f"router name {SPINE_ROUTER} is the name of the fabric's spine router: pick another")
        elif other is not None and (given or _router_given(racks_in, other.index, "name")):
            issues.add(loc, f"router name {rack.router}{'' if given else ' (the default tor-<rack>)'} is already "
                            f"used by the router of rack {other.name} (spec.underlay.racks[{other.index}]): give "
                            "each router its own name")
        routers.setdefault(rack.router, rack)


def _router_given(racks_in: list[RackIn], index: int, key: str) -> bool:
    """Whether rack `index` sets router.<key> itself (messages then point at it, not at a default)."""
    router = racks_in[index].router
    return router is not None and getattr(router, key) is not None


def _check_rack_subnets(racks: list[Rack], fabric: Fabric | None, fabric_in: FabricIn | None,
                        issues: Issues) -> None:
    """Each rack is its own L2 segment reached by routing, so rack subnets and the fabric never overlap."""
    for later, rack in enumerate(racks):
        loc = rack_loc(rack.index) + ("subnet",)
        for earlier in racks[:later]:
            if rack.subnet.overlaps(earlier.subnet):
                overlap(rack_loc(earlier.index) + ("subnet",), earlier.subnet, "given", loc, rack.subnet, "given",
                        "each rack is its own segment behind its own router, so racks need separate subnets; "
                        f"pick another subnet for rack {rack.name}", issues)
        if fabric is not None and rack.subnet.overlaps(fabric.cidr):
            overlap(loc, rack.subnet, "given", ("spec", "underlay", "fabric", "cidr"), fabric.cidr,
                    fabric_in.cidr if fabric_in is not None else None,
                    "the fabric's links between routers need a range of their own; pick ranges that do not "
                    "overlap", issues)


def _check_rack_asns(racks_in: list[RackIn], racks: list[Rack], fabric_in: FabricIn, issues: Issues) -> None:
    """Routers of different racks peer by eBGP (with the spine, or each other on a direct fabric), and eBGP
    needs a different AS at each end: every rack's AS is its own and differs from the spine's."""
    seen: dict[int, Rack] = {}
    spine = _spine_asn(fabric_in)
    used = {r.asn for r in racks} | ({spine} if spine is not None else set())
    for rack in racks:
        given = _router_given(racks_in, rack.index, "as_number")
        loc = rack_loc(rack.index) + ("router", "asNumber")
        note = "" if given else f" (the default, {TOR_AS_BASE} + rack index)"
        if rack.asn in seen:
            issues.add(loc, f"asNumber {rack.asn}{note} is already the AS of rack {seen[rack.asn].name}: each rack is "
                            f"an AS of its own, its router peering by eBGP; pick another, e.g. {_free_asn(used)}")
        elif rack.asn == spine and (given or fabric_in.spine_as_number is None):
            issues.add(loc, f"asNumber {rack.asn}{note} is also the spine's AS (fabric.spineASNumber): the spine "
                            f"and the top-of-rack routers peer by eBGP, which needs different ASes; pick another, "
                            f"e.g. {_free_asn(used)}")
        elif rack.asn == spine:
            issues.add(("spec", "underlay", "fabric", "spineASNumber"),
                       f"spineASNumber {spine} is also the AS of rack {rack.name}'s router{note}: the spine and the "
                       f"top-of-rack routers peer by eBGP, which needs different ASes; pick another, e.g. {SPINE_AS}")
        seen.setdefault(rack.asn, rack)


def _spine_asn(fabric_in: FabricIn) -> int | None:
    """The spine's AS as written or defaulted (even if another fabric field is wrong); None without a spine."""
    mode = fabric_in.mode if fabric_in.mode is not None else Fabric().mode
    if mode != "spine":
        return None
    return fabric_in.spine_as_number if fabric_in.spine_as_number is not None else Fabric().spine_asn


def _free_asn(used: set[int]) -> int:
    asn = TOR_AS_BASE
    while asn in used:
        asn += 1
    return asn


def check_host_names(nodes_in: list[NodeIn], racks_in: list[RackIn] | None, fabric_in: FabricIn | None,
                     issues: Issues) -> None:
    """Routers are hosts of the lab like nodes (each has a namespace named after it), so their names differ.
    Checked on the racks as written, so a clash shows up even while another rack field is wrong."""
    racks_in = racks_in or []
    routers: dict[str, int] = {}
    for index, rack_in in enumerate(racks_in):
        routers.setdefault(_router_name_of(rack_in), index)
    spine = _spine_asn(fabric_in or FabricIn()) is not None
    for index, node in enumerate(nodes_in):
        loc = ("spec", "nodes", index, "name")
        rack = routers.get(node.name)
        if racks_in and spine and node.name == SPINE_ROUTER:
            issues.add(loc, f"node name {SPINE_ROUTER} is the name of the fabric's spine router: rename the node")
        elif rack is not None and _router_given(racks_in, rack, "name"):
            issues.add(rack_loc(rack) + ("router", "name"),
                       f"router name {node.name} is also the name of node spec.nodes[{index}]: routers and nodes "
                       "are hosts of one lab and need different names; rename one")
        elif rack is not None:
            issues.add(loc, f"node name {node.name} is the default name of rack {racks_in[rack].name}'s router "
                            f"(tor-<rack>): rename the node, or give the router another name with "
                            f"underlay.racks[{rack}].router.name")


def host_names(nodes_in: list[NodeIn], racks_in: list[RackIn] | None, fabric_in: FabricIn | None) -> dict[str, str]:
    """Names of the lab's nodes and routers, each with how a message names its owner (external hosts may
    take none of them)."""
    taken: dict[str, str] = {}
    for index, node in enumerate(nodes_in):
        taken.setdefault(node.name, f"also the name of node spec.nodes[{index}]")
    for index, rack_in in enumerate(racks_in or []):
        taken.setdefault(_router_name_of(rack_in), f"the name of rack {rack_in.name}'s router "
                                                   f"(spec.underlay.racks[{index}])")
    if racks_in and _spine_asn(fabric_in or FabricIn()) is not None:
        taken.setdefault(SPINE_ROUTER, "the name of the fabric's spine router")
    return taken


# ---------------------------------------------------------------------------- fabric


def _check_fabric(fabric_in: FabricIn, rack_count: int, issues: Issues) -> Fabric | None:
    """How the ToRs are joined; its addresses come from fabric.cidr as topo.underlay.fabric_links cuts it."""
    loc = ("spec", "underlay", "fabric")
    default = Fabric()
    before = len(issues)
    mode = fabric_in.mode if fabric_in.mode is not None else default.mode
    if mode not in FABRIC_MODES:
        issues.add(loc + ("mode",), f"mode must be spine (one spine router, a point-to-point link to each "
                                    f"top-of-rack router) or direct (every top-of-rack router on one segment), got "
                                    f"{short(repr(mode), 40)}")
    cidr = parse_network(given_or_default(fabric_in.cidr, default.cidr), loc + ("cidr",), str(default.cidr), issues)
    spine_asn = fabric_in.spine_as_number if fabric_in.spine_as_number is not None else default.spine_asn
    _check_asn(spine_asn, "spineASNumber", loc + ("spineASNumber",), issues)
    if mode == "direct" and fabric_in.spine_as_number is not None:
        issues.add(loc + ("spineASNumber",), "spineASNumber is only used by mode spine (with mode direct the "
                                             "top-of-rack routers peer with each other): remove it")
    if cidr is not None and mode in FABRIC_MODES:
        _check_fabric_room(mode, cidr, fabric_in.cidr, rack_count, loc + ("cidr",), issues)
    if len(issues) > before or cidr is None:
        return None
    return Fabric(mode=mode, cidr=cidr, spine_asn=spine_asn)


def _fabric_room(mode: str, prefixlen: int) -> int:
    """Racks a fabric range of this size joins: spine, one /30 per ToR (spine .1, ToR .2); direct, one
    address per ToR on a shared segment, less the network and broadcast addresses."""
    addresses = 2 ** (32 - prefixlen)
    if mode == "spine":
        return addresses // 4 if prefixlen <= 30 else 0
    return max(addresses - 2, 0)


def _check_fabric_room(mode: str, cidr: IPv4Network, given: str | None, racks: int, loc: Loc,
                       issues: Issues) -> None:
    room = _fabric_room(mode, cidr.prefixlen)
    if room >= racks:
        return
    needed = max(p for p in range(0, 31) if _fabric_room(mode, p) >= racks)
    example = IPv4Network(f"{cidr.network_address}/{needed}", strict=False)
    why = ("mode spine gives each top-of-rack router its own /30 link to the spine (4 addresses)" if mode == "spine"
           else "mode direct puts every top-of-rack router on one segment (an address each, plus the network and "
                "broadcast addresses)")
    issues.add(loc, f"{cidr}{default_note(given)} is too small for {count(racks, 'rack')}: {why}, so a "
                    f"/{cidr.prefixlen} holds {count(room, 'rack')}; use a /{needed} or larger, e.g. {example}")


# ---------------------------------------------------------------------------- network


def check_network(network_in: NetworkIn, underlay: Underlay | None, issues: Issues) -> Network | None:
    base = ("spec", "network")
    backend = network_in.backend if network_in.backend is not None else Network().backend
    ok = _check_backend(backend, issues)
    link_mtu = underlay.link.mtu if underlay is not None else None
    mtu = network_in.mtu if network_in.mtu is not None else _default_mtu(backend, link_mtu)
    if not MTU_MIN <= mtu <= MTU_MAX:
        if network_in.mtu is not None:
            issues.add(base + ("mtu",), f"mtu {show(mtu)} is out of range: use {MTU_MIN}..{MTU_MAX} "
                                        f"({DEFAULT_MTU} is Ethernet's usual size)")
        else:
            overhead = _OVERHEAD.get(backend, 0)
            issues.add(("spec", "underlay", "link", "mtu"),
                       f"mtu {link_mtu} leaves pods {mtu} bytes once {backend} adds its {overhead} bytes of "
                       f"headers, below the minimum {MTU_MIN}: use {MTU_MIN + overhead} or more, or set "
                       "network.mtu")
        ok = False
    bgp = _check_bgp(network_in.bgp, backend, issues)
    ipip_mode = _check_ipip_mode(network_in.ipip_mode, backend, issues)
    if not ok or bgp is None or ipip_mode is None:
        return None
    return Network(backend=backend, mtu=mtu, bgp=bgp, ipip_mode=ipip_mode)


def _check_ipip_mode(mode: str | None, backend: str, issues: Issues) -> str | None:
    """Calico's IPPool ipipMode: Always or CrossSubnet (Never is what backend bgp already is)."""
    loc = ("spec", "network", "ipipMode")
    if mode is None:
        return Network().ipip_mode
    if backend != "ipip":
        if backend in BACKENDS:
            issues.add(loc, "ipipMode is only used by backend ipip: remove it, or set backend: ipip")
        return None
    if mode in IPIP_MODES:
        return mode
    if mode == "Never":
        issues.add(loc, "ipipMode Never is Calico's BGP mode without encapsulation: use backend: bgp instead")
        return None
    known = {m.lower(): m for m in IPIP_MODES}
    hint = f" (did you mean {known[mode.lower()]}?)" if isinstance(mode, str) and mode.lower() in known else ""
    issues.add(loc, f"unknown ipipMode {short(repr(mode), 40)}{hint}: use Always (every packet between nodes "
                    "is encapsulated) or CrossSubnet (only between nodes in different subnets), as in Calico's IPPool")
    return None


def _check_backend(backend: str, issues: Issues) -> bool:
    if backend in BACKENDS:
        return True
    loc = ("spec", "network", "backend")
    supported = ", ".join(BACKENDS)
    if backend in PLANNED_BACKENDS:
        issues.add(loc, f"backend {backend} is not implemented yet; supported: {supported}")
    elif backend.lower() in BACKEND_HINTS:
        hint = BACKEND_HINTS[backend.lower()]
        issues.add(loc, f"unknown backend {short(repr(backend), 40)} (did you mean {hint}?); supported: {supported}")
    else:
        issues.add(loc, f"unknown backend {short(repr(backend), 40)}; supported: {supported}")
    return False


_OVERHEAD = {"vxlan": VXLAN_OVERHEAD, "ipip": IPIP_OVERHEAD}


def _default_mtu(backend: str, link_mtu: int | None) -> int:
    """The pods' MTU when none is given. Flannel's vxlan wraps every pod packet in 50 bytes of outer headers,
    so pods get the underlay's MTU minus 50 (1450 on a 1500-byte underlay); Calico's IP-in-IP adds one IPv4
    header, 20 bytes (1480, Calico's own figure; with CrossSubnet too, as Calico sizes every pod for the
    tunnel); host-gw and Calico's BGP mode (without IPIP) route pod packets as they are, so pods get the
    underlay's MTU."""
    underlay = link_mtu if link_mtu is not None else DEFAULT_MTU
    return underlay - _OVERHEAD.get(backend, 0)


def _check_bgp(bgp_in: _BgpIn | None, backend: str, issues: Issues) -> Bgp | None:
    loc = ("spec", "network", "bgp")
    if bgp_in is None:
        return Bgp()
    if backend not in ("bgp", "ipip"):
        if backend in BACKENDS:
            issues.add(loc, "network.bgp is only used by backends bgp and ipip: remove it, or set backend: bgp")
        return None
    ok = True
    peering = bgp_in.peering if bgp_in.peering is not None else Bgp().peering
    if backend == "ipip" and peering == "tor":
        # The routers would reflect pod routes with themselves as next hop, and a router does not
        # decapsulate: Calico's IP-in-IP runs over the node mesh, the underlay only carries node addresses.
        issues.add(loc + ("peering",), "peering tor does not work with backend ipip: the racks' routers would "
                                       "become the next hop of pod routes and cannot unwrap IP-in-IP; use "
                                       "peering: mesh (the tunnel crosses the racks), or backend: bgp with "
                                       "peering: tor (no encapsulation)")
        ok = False
    if peering not in PEERINGS:
        issues.add(loc + ("peering",), f"peering must be mesh (every node peers with every other) or tor (each node "
                                       f"peers with its rack's router), got {short(repr(peering), 40)}")
        ok = False
    # Calico's default AS for the cluster's nodes; with peering tor the nodes take their rack's AS instead.
    asn = bgp_in.as_number if bgp_in.as_number is not None else CALICO_AS
    ok = _check_asn(asn, "asNumber", loc + ("asNumber",), issues) and ok
    if peering == "tor" and bgp_in.as_number is not None:
        issues.add(loc + ("asNumber",), "asNumber is not used with peering tor: as in Calico's AS-per-rack model, "
                                        "each node takes its rack's AS (underlay.racks[].router.asNumber); remove it, "
                                        "or use peering: mesh")
        ok = False
    return Bgp(asn=asn, peering=peering) if ok else None


def check_routing(network_in: NetworkIn, network: Network, nodes_in: list[NodeIn], racks: tuple[str, ...] | None,
                  issues: Issues) -> None:
    """Whether the pod backend can carry traffic between nodes over this underlay."""
    base = ("spec", "network")
    spread = _two_racks(nodes_in, racks)
    if network.backend == "host-gw" and spread is not None:
        # Flannel's host-gw installs "PodCIDR via <node IP>" routes: the next hop must be on the same L2 segment.
        (first, first_rack), (other, other_rack) = spread
        issues.add(base + ("backend",),
                   f"backend host-gw{default_note(network_in.backend)} needs every node on one L2 segment: Flannel's "
                   "host-gw routes a PodCIDR straight to the other node's IP, which must be on-link, but "
                   f"{first} is in {first_rack} and {other} in {other_rack}; use backend vxlan or bgp, or put all "
                   "nodes in one rack")
    if network.backend != "bgp":
        return
    given = (network_in.bgp or _BgpIn()).peering
    if network.bgp.peering == "tor" and not racks:
        issues.add(base + ("bgp", "peering"), "peering tor needs top-of-rack routers: give underlay.racks, or use "
                                              "peering: mesh")
    if network.bgp.peering == "mesh" and spread is not None:
        # A node mesh keeps pod routes among the nodes; the ToRs only know rack subnets, and a pod packet for
        # another rack is routed by them (the next hop, a node of another rack, is not on-link).
        (first, first_rack), (other, other_rack) = spread
        issues.add(base + ("bgp", "peering"),
                   f"peering mesh{default_note(given)} leaves the racks' routers without pod routes: the nodes "
                   f"announce their PodCIDRs only to each other, so a packet from a pod on {first} ({first_rack}) "
                   f"to a pod on {other} ({other_rack}) goes to {first_rack}'s router, which has no route to "
                   f"{other}'s PodCIDR and drops it; use peering: tor (each node peers with its rack's router, "
                   "the route reflector of Calico's AS-per-rack model), or backend: ipip with ipipMode: "
                   "CrossSubnet (Calico's IP-in-IP between racks)")


def _two_racks(nodes_in: list[NodeIn], racks: tuple[str, ...] | None
               ) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The first two nodes (with their racks) that sit in different racks, or None if all share one."""
    placed = [(n.name, n.rack) for n in nodes_in if racks and n.rack in racks]
    for name, rack in placed[1:]:
        if rack != placed[0][1]:
            return (placed[0][0], placed[0][1]), (name, rack)  # type: ignore[return-value]
    return None
