"""kube-proxy's nftables partial sync sent as ONE nfnetlink batch from this process, without `nft -f`.

Why: `nft -f` of even a one-line transaction first fills its cache, and for `add rule` or `add element`
nft 1.0.6 lists every chain and set of the table: ~0.1 s at 10,000 services, measured by hand in a scratch
namespace (`add chain` alone: 0.00 s; `add element` alone: 0.11-0.17 s; the +1 service delta: 0.11 s),
which was most of a +1 sync. Here the delta (services/kube_proxy_nftables.render_delta's operations, in its
order) is encoded as the very netlink messages nft would send: NFT_MSG_NEWCHAIN, NFT_MSG_DELRULE without a
handle (a chain flush), NFT_MSG_NEWRULE with the expressions `nft --debug=netlink` shows for these rules,
NFT_MSG_DELCHAIN, NFT_MSG_NEWSET / DELSET, NFT_MSG_NEWSETELEM / DELSETELEM, between NFNL_MSG_BATCH_BEGIN
and END. The kernel commits the batch atomically, like one `nft -f`. The batch carries the generation id
the caller read (NFNL_BATCH_GENID): if anything committed to the namespace since, the kernel refuses the
whole batch (ERESTART) and the caller replaces the table whole.

Only the rule shapes kube_proxy_nftables writes into per-service chains are encoded (payload/meta/fib/
numgen matches, jump/goto/return/drop, dnat, ClientIP affinity's set lookup and `update`) and its
affinity sets; anything else (the egress table, a changed base chain or map) raises Unsupported and the
caller uses `nft -f`. Hand-packed like kube_proxy_partial.nft_generation and topo/rtnl.py: pyroute2
0.9.7's NFTSocket has message classes for these, but its batch carries no NFNL_BATCH_GENID and the
expressions would be spelled attribute by attribute all the same. The encodings follow the kernel's uapi
(linux/netfilter/nf_tables.h); the result is checked against `nft -f`'s, as `nft list ruleset` prints
both, in tests/integration/test_nft_netlink.py.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

from services import kube_proxy_nftables as kp
from topo import netns
from topo.errors import ApplyError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_BATCH_GENID = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x200, 0x400, 0x800
NLMSG_ERROR = 2
SO_SNDBUFFORCE = 32
ELEMENTS_MAX = 48 << 10  # bytes of set elements per message (a netlink attribute holds 64 KiB)
NLA_F_NESTED = 0x8000
NFPROTO_IPV4 = 2

# message types (enum nf_tables_msg_types)
NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSET, DELSET, NEWSETELEM, DELSETELEM = 3, 5, 6, 8, 9, 11, 12, 14
SET_NAME, SET_ID = 2, 10
NFT_SET_TIMEOUT, NFT_SET_EVAL = 0x10, 0x20  # flags timeout, dynamic
TYPE_IPADDR = 7  # nft's datatype id of ipv4_addr
BYTEORDER_BIG_ENDIAN = 2  # NFTNL_UDATA_SET_KEYBYTEORDER's value
# attributes
CHAIN_TABLE, CHAIN_NAME = 1, 3
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS = 1, 2, 4
LIST_ELEM = 1
EXPR_NAME, EXPR_DATA = 1, 2
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
SET_ELEM_LIST_TABLE, SET_ELEM_LIST_SET, SET_ELEM_LIST_ELEMENTS = 1, 2, 3
SET_ELEM_KEY, SET_ELEM_DATA = 1, 2
# verdict codes
VERDICTS = {"accept": 1, "drop": 0, "jump": -3, "goto": -4, "return": -5}
REG_VERDICT, REG_1, REG_2 = 0, 1, 2
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
IP_FIELDS = {"saddr": 12, "daddr": 16}  # offsets in the IPv4 header
RTN_LOCAL = 2


class Unsupported(Exception):
    """A change this module does not encode: the caller falls back to `nft -f`."""


# --- attributes ------------------------------------------------------------------------------------

def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">i" if value < 0 else ">I", value))


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _value(kind: int, data: bytes) -> bytes:
    return _nest(kind, _attr(DATA_VALUE, data))


def _verdict(kind: int, words: list[str]) -> bytes:
    """A verdict ("goto CHAIN", "drop", ...) as NFTA_DATA_VERDICT nested in attribute `kind`."""
    if not words or words[0] not in VERDICTS or len(words) != (2 if words[0] in ("jump", "goto") else 1):
        raise Unsupported(" ".join(words))
    inner = [_u32(VERDICT_CODE, VERDICTS[words[0]])]
    if len(words) == 2:
        inner.append(_str(VERDICT_CHAIN, words[1]))
    return _nest(kind, _nest(DATA_VERDICT, *inner))


# --- expressions -----------------------------------------------------------------------------------

def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(LIST_ELEM, _str(EXPR_NAME, name), _nest(EXPR_DATA, *attrs))


def _payload(base: int, offset: int, length: int) -> bytes:  # NFT_PAYLOAD_{NETWORK,TRANSPORT}_HEADER = 1, 2
    return _expr("payload", _u32(1, REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _cmp(op: int, data: bytes) -> bytes:  # NFT_CMP_EQ = 0, NFT_CMP_NEQ = 1
    return _expr("cmp", _u32(1, REG_1), _u32(2, op), _value(3, data))


def _l4proto(proto: str) -> list[bytes]:
    if proto not in PROTOCOLS:
        raise Unsupported(proto)
    return [_expr("meta", _u32(1, REG_1), _u32(2, 16)),  # NFT_META_L4PROTO
            _cmp(0, bytes([PROTOCOLS[proto]]))]


def _ip_match(field: str, op: int, text: str) -> list[bytes]:
    """`ip saddr|daddr [!=] ADDRESS[/PREFIX]` the way nft 1.0.6 compiles it: a whole-byte prefix loads only
    its bytes; any other prefix loads the address and masks it (bitwise)."""
    if text.startswith("@") and op == 0:  # membership of a set (ClientIP affinity): NFTA_LOOKUP_SREG, _SET
        return [_payload(1, IP_FIELDS[field], 4), _expr("lookup", _u32(2, REG_1), _str(1, text[1:]))]
    try:
        net = IPv4Network(text)
    except ValueError as exc:
        raise Unsupported(text) from exc
    offset, prefix = IP_FIELDS[field], net.prefixlen
    if prefix == 0:
        raise Unsupported(text)
    if prefix % 8 == 0:
        size = prefix // 8 or 4
        return [_payload(1, offset, size), _cmp(op, net.network_address.packed[:size])]
    mask = net.netmask.packed
    return [_payload(1, offset, 4),
            _expr("bitwise", _u32(1, REG_1), _u32(2, REG_1), _u32(3, 4), _value(4, mask), _value(5, bytes(4))),
            _cmp(op, net.network_address.packed)]


def compile_rule(rule: str) -> bytes:
    """One rule of a kube-proxy per-service chain as NFTA_RULE_EXPRESSIONS; Unsupported for other shapes."""
    words = rule.split()
    exprs: list[bytes] = []
    proto = None
    i = 0
    while i < len(words):
        w, rest = words[i], words[i + 1:]
        if w == "ip" and rest[:1] and rest[0] in IP_FIELDS and len(rest) >= 2:
            op = 1 if rest[1] == "!=" else 0
            value = rest[2] if op else rest[1]
            exprs += _ip_match(rest[0], op, value)
            i += 4 if op else 3
        elif w == "meta" and rest[:1] == ["l4proto"] and len(rest) >= 2:
            exprs += _l4proto(rest[1])
            proto = rest[1]
            i += 3
        elif w in PROTOCOLS and rest[:1] == ["dport"] and len(rest) >= 2 and rest[1].isdigit():
            if proto != w:  # nft's implicit dependency, right before the transport header load
                exprs += _l4proto(w)
                proto = w
            exprs += [_payload(2, 2, 2), _cmp(0, struct.pack(">H", int(rest[1])))]
            i += 3
        elif w == "numgen" and rest[:2] == ["random", "mod"] and len(rest) >= 5 and rest[3] == "==":
            if not (rest[2].isdigit() and rest[4].isdigit()):
                raise Unsupported(rule)
            # NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE (NFT_NG_RANDOM), NFTA_NG_OFFSET
            exprs += [_expr("numgen", _u32(1, REG_1), _u32(2, int(rest[2])), _u32(3, 1), _u32(4, 0)),
                      _cmp(0, struct.pack("=I", int(rest[4])))]
            i += 6
        elif w == "update" and len(rest) == 5 and rest[0].startswith("@") and rest[1:] in (
                ["{", "ip", "saddr", "}"], ["{", "ip", "daddr", "}"]):
            # ClientIP affinity: NFTA_DYNSET_SREG_KEY, _OP (NFT_DYNSET_OP_UPDATE), _SET_NAME
            exprs += [_payload(1, IP_FIELDS[rest[3]], 4),
                      _expr("dynset", _u32(4, REG_1), _u32(3, 1), _str(1, rest[0][1:]))]
            i = len(words)
        elif w == "fib" and rest[:3] == ["saddr", "type", "local"]:
            # NFTA_FIB_DREG, NFTA_FIB_RESULT (NFT_FIB_RESULT_ADDRTYPE), NFTA_FIB_FLAGS (NFTA_FIB_F_SADDR)
            exprs += [_expr("fib", _u32(1, REG_1), _u32(2, 3), _u32(3, 1)), _cmp(0, struct.pack("=I", RTN_LOCAL))]
            i += 4
        elif w == "dnat" and rest[:1] == ["to"] and len(rest) == 2 and proto is not None:
            addr, _, port = rest[1].partition(":")
            try:
                packed = IPv4Address(addr).packed
                port_bytes = struct.pack(">H", int(port))
            except ValueError as exc:
                raise Unsupported(rule) from exc
            exprs += [_expr("immediate", _u32(1, REG_1), _value(2, packed)),
                      _expr("immediate", _u32(1, REG_2), _value(2, port_bytes)),
                      # NFTA_NAT_TYPE (DNAT), FAMILY, REG_ADDR_MIN, REG_PROTO_MIN, FLAGS (PROTO_SPECIFIED)
                      _expr("nat", _u32(1, 1), _u32(2, NFPROTO_IPV4), _u32(3, REG_1), _u32(5, REG_2),
                            _u32(7, 2))]
            i = len(words)
        elif w in VERDICTS:
            exprs.append(_expr("immediate", _u32(1, REG_VERDICT), _verdict(2, words[i:])))
            i = len(words)
        else:
            raise Unsupported(rule)
    return _nest(RULE_EXPRESSIONS, *exprs)


# --- map elements ----------------------------------------------------------------------------------

def _key(map_type: str, key: str) -> bytes:
    """A concatenated key (`ipv4_addr . inet_proto . inet_service`): each field padded to 4 bytes."""
    types = [t.strip() for t in map_type.split(":")[0].split(".")]
    values = [v.strip() for v in key.split(" . ")]
    if len(types) != len(values):
        raise Unsupported(key)
    out = b""
    try:
        for t, v in zip(types, values):
            if t == "ipv4_addr":
                field = IPv4Address(v).packed
            elif t == "inet_proto":
                field = bytes([PROTOCOLS[v] if v in PROTOCOLS else int(v)])
            elif t == "inet_service":
                field = struct.pack(">H", int(v))
            else:
                raise Unsupported(t)
            out += field + b"\0" * (-len(field) % 4)
    except (ValueError, KeyError) as exc:
        raise Unsupported(key) from exc
    return out


def _elements(m: kp.Map, pairs: list[tuple[str, str | None]]) -> list[bytes]:
    """The attributes of one or more set element messages (an attribute holds at most 64 KiB: as nft
    does, a long list is split over several messages of the same transaction)."""
    head = _str(SET_ELEM_LIST_TABLE, kp.TABLE) + _str(SET_ELEM_LIST_SET, m.name)
    out: list[bytes] = []
    elems: list[bytes] = []
    size = 0
    for key, verdict in pairs:
        attrs = [_value(SET_ELEM_KEY, _key(m.type, key))]
        if verdict is not None:
            attrs.append(_verdict(SET_ELEM_DATA, verdict.split()))
        elem = _nest(LIST_ELEM, *attrs)
        if size + len(elem) > ELEMENTS_MAX:
            out.append(head + _nest(SET_ELEM_LIST_ELEMENTS, *elems))
            elems, size = [], 0
        elems.append(elem)
        size += len(elem)
    if elems:
        out.append(head + _nest(SET_ELEM_LIST_ELEMENTS, *elems))
    return out


# --- the batch -------------------------------------------------------------------------------------

def _set(declaration: str) -> bytes:
    """An affinity set's NFTA_SET_FLAGS, _KEY_TYPE, _KEY_LEN, _TIMEOUT and _USERDATA, as nft 1.0.6 sends
    them for `type ipv4_addr; flags dynamic,timeout; timeout Ns;` (the only declaration kp writes)."""
    match = re.fullmatch(r"type ipv4_addr; flags dynamic,timeout; timeout (\d+)s;", declaration)
    if match is None:
        raise Unsupported(declaration)
    return (_u32(3, NFT_SET_TIMEOUT | NFT_SET_EVAL) + _u32(4, TYPE_IPADDR) + _u32(5, 4)
            + _attr(11, struct.pack(">Q", int(match[1]) * 1000))
            + _attr(13, bytes([0, 4]) + struct.pack("=I", BYTEORDER_BIG_ENDIAN)))  # udata: key byte order


def delta_messages(old: kp.Ruleset, new: kp.Ruleset) -> list[tuple[int, int, bytes]]:
    """render_delta's transaction as (message type, flags, attributes), in its order; Unsupported when
    nft -f is needed (the egress table, base chains or maps that differ)."""
    if kp._skeleton(old) != kp._skeleton(new) or old.egress != new.egress:
        raise Unsupported("table skeleton or egress changed")
    old_sets = {s.name: s.declaration for s in old.sets}
    new_sets = {s.name: s.declaration for s in new.sets}
    gone_sets = [n for n in old_sets if n not in new_sets]
    redone_sets = [n for n in new_sets if n in old_sets and old_sets[n] != new_sets[n]]
    added_sets = [n for n in new_sets if n not in old_sets]
    old_chains, new_chains = old.chain_rules, new.chain_rules
    added = [n for n in new_chains if n not in old_chains]
    deleted = [n for n in old_chains if n not in new_chains]
    refs = tuple(f"@{n} " for n in redone_sets)  # a chain naming a re-created set is rewritten too
    changed = [n for n in new_chains if n in old_chains and (
        old_chains[n] != new_chains[n] or (refs and any(r in rule + " " for rule in old_chains[n] for r in refs)))]
    table = _str(CHAIN_TABLE, kp.TABLE)  # NFTA_CHAIN_TABLE == NFTA_RULE_TABLE == NFTA_SET_TABLE == 1
    msgs: list[tuple[int, int, bytes]] = []
    puts = []
    for om, nm in zip(old.maps, new.maps):
        was, now = dict(om.elements), dict(nm.elements)
        drop = [(k, None) for k, v in was.items() if now.get(k) != v]
        put = [(k, v) for k, v in now.items() if was.get(k) != v]
        msgs += [(DELSETELEM, 0, attrs) for attrs in _elements(om, drop)]
        puts += [(NEWSETELEM, NLM_F_CREATE, attrs) for attrs in _elements(nm, put)]
    msgs += [(NEWCHAIN, NLM_F_CREATE, table + _str(CHAIN_NAME, n)) for n in added]
    msgs += [(DELRULE, 0, table + _str(RULE_CHAIN, n)) for n in changed + deleted]
    msgs += [(DELSET, 0, table + _str(SET_NAME, n)) for n in gone_sets + redone_sets]
    msgs += [(NEWSET, NLM_F_CREATE, table + _str(SET_NAME, n) + _u32(SET_ID, set_id) + _set(new_sets[n]))
             for set_id, n in enumerate(added_sets + redone_sets, start=1)]  # the kernel requires an id
    for n in added + changed:
        msgs += [(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, table + _str(RULE_CHAIN, n) + compile_rule(rule))
                 for rule in new_chains[n]]
    msgs += [(DELCHAIN, 0, table + _str(CHAIN_NAME, n)) for n in deleted]
    return msgs + puts


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def send_batch(ns: str, msgs: list[tuple[int, int, bytes]], generation: int | None) -> None:
    """Commit these messages as one transaction in namespace `ns`, refused by the kernel if the namespace's
    nf_tables generation is no longer `generation`. ApplyError with the kernel's reason on failure."""
    if not msgs:
        return
    genid = _u32(NFNL_BATCH_GENID, generation) if generation else b""
    parts = [_message(NFNL_MSG_BATCH_BEGIN, 0, 1, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, genid)]
    end = len(msgs) + 2
    for seq, (kind, flags, attrs) in enumerate(msgs, start=2):
        # errors are always answered; the one ack asked for (the last message's) comes after them all
        ack = NLM_F_ACK if seq == end - 1 else 0
        parts.append(_message(NFNL_SUBSYS_NFTABLES << 8 | kind, flags | ack, seq, NFPROTO_IPV4, 0, attrs))
    parts.append(_message(NFNL_MSG_BATCH_END, 0, end, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b""))
    batch = b"".join(parts)
    try:
        failures = _talk(ns, batch, end - 1)
    except OSError as exc:  # e.g. ENOBUFS: too many errors to hold
        raise ApplyError(f"nf_tables batch in {ns}: {exc.strerror or exc}") from exc
    if failures:
        seq, code = failures[0]
        what = "the batch" if seq == 1 else f"message {seq - 1} of {len(msgs)}"
        raise ApplyError(f"nf_tables batch in {ns} failed at {what}: {os.strerror(code)}"
                         + (" (the ruleset changed meanwhile)" if code == errno.ERESTART else ""))


def _talk(ns: str, batch: bytes, last: int) -> list[tuple[int, int]]:
    """Send the batch (one datagram: the kernel takes a batch whole) and collect (seq, errno) of the
    failures, until the last message's ack."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    with sock:
        if len(batch) > 1 << 17:  # above the default send buffer: as nft does, force a larger one (root)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch) + 4096)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(batch) + 4096)
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.sendto(batch, (0, 0))
        pending, failures = {last}, []
        try:
            while pending:
                data = sock.recv(1 << 16)
                off = 0
                while off + 16 <= len(data):
                    size, kind, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                    if kind == NLMSG_ERROR and size >= 20:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        pending.discard(seq)
                        if code:
                            failures.append((seq, code))
                            if seq == 1:  # the batch itself refused (generation moved): nothing else comes
                                pending.clear()
                            sock.settimeout(0.2)  # the rest of the acks, if the kernel sends them
                    off += (size + 3) & ~3
                    if size < 16:
                        break
        except (TimeoutError, socket.timeout) as exc:
            if not failures:
                raise ApplyError(f"nf_tables batch in {ns}: no answer from the kernel") from exc
    return failures


def apply_delta(ns: str, old: kp.Ruleset, new: kp.Ruleset, generation: int | None) -> None:
    """Turn the kernel's `old` into `new` with one batch; Unsupported (nothing sent) or ApplyError."""
    send_batch(ns, delta_messages(old, new), generation)
