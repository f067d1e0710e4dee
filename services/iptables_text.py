"""The iptables-restore / iptables-save text format read back: parsed into tables and chains, compared
(kube-proxy's partial sync on two full texts), checked for what iptables-restore would refuse.

Split from services/kube_proxy_iptables.py (which renders that text and re-exports these names), so each
stays a readable size; pure, no kernel.
"""
from __future__ import annotations

import shlex

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"

NAT_BUILTINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
FILTER_BUILTINS = ("INPUT", "FORWARD", "OUTPUT")

# Targets that are kernel extensions, not chains: a jump to anything else must name a declared chain.
TARGETS = frozenset({
    "ACCEPT", "DROP", "RETURN", "REJECT", "QUEUE", "NFQUEUE", "DNAT", "SNAT", "MASQUERADE", "REDIRECT",
    "MARK", "CONNMARK", "LOG", "NFLOG", "CT", "NOTRACK", "TPROXY", "TRACE", "CLASSIFY", "TCPMSS",
})


# --------------------------------------------------------------------------------- reading back


def tables(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse restore/save text: table -> chain -> its rules (what follows `-A CHAIN `), declared chains
    included even when empty. Counters, comments and COMMIT lines are dropped."""
    out: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            current = out.setdefault(line[1:], {})
        elif current is None:
            raise ValueError(f"line outside any table: {line}")
        elif line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.setdefault(chain, []).append(rest[0] if rest else "")
        else:
            raise ValueError(f"not a chain or -A line: {line}")
    return out


def render_delta(old: str, new: str) -> str | None:
    """kube-proxy's partial sync (Kubernetes 1.28+): the `iptables-restore --noflush` input that turns the
    rules loaded from `old` into `new`, writing only the chains whose rules changed (a chain declared with
    `:CHAIN - [0:0]` is flushed, then its rules follow), flushing and deleting (`-X`) the chains that are
    gone, leaving every other chain untouched. None when a partial load cannot express the change (a
    built-in chain changed: --noflush would append to it; or the set of tables changed): load `new` whole."""
    return delta_tables(tables(old), tables(new))


def delta_tables(before: dict[str, dict[str, list[str]]], after: dict[str, dict[str, list[str]]]) -> str | None:
    """render_delta on parsed tables (see tables())."""
    if before.keys() != after.keys():
        return None
    builtins = {"filter": FILTER_BUILTINS, "nat": NAT_BUILTINS}
    out: list[str] = []
    for table, chains_now in after.items():
        was = before[table]
        fixed = builtins.get(table, ())
        if any(was.get(chain) != chains_now.get(chain) for chain in fixed) or any(
                chain not in chains_now for chain in fixed if chain in was):
            return None
        changed = [c for c, rules in chains_now.items()
                   if c not in fixed and (was.get(c) != rules or (table, c) in _EVERY_SYNC)]
        gone = [c for c in was if c not in chains_now and c not in fixed]
        if not changed and not gone:
            continue
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in (*changed, *gone)]
        for chain in changed:
            out += [f"-A {chain} {spec}" if spec else f"-A {chain}" for spec in chains_now[chain]]
        out += [f"-X {chain}" for chain in gone]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# The chains holding one rule per service port. kube-proxy's partial sync writes them whole on every
# sync, changed or not (only unchanged services' own KUBE-SVC/KUBE-SEP chains are left out), so a rule of
# theirs deleted by hand comes back with the next change of any Service (what exercise 13's solution uses).
_EVERY_SYNC = {("nat", KUBE_SERVICES), ("nat", KUBE_NODEPORTS), ("filter", KUBE_SERVICES),
               ("filter", KUBE_EXTERNAL_SERVICES)}


def chains(text: str, table: str = "nat") -> dict[str, list[str]]:
    """One table's chains and rules (see tables())."""
    return tables(text).get(table, {})


def _jump(spec: str) -> str | None:
    words = shlex.split(spec)
    for flag in ("-j", "--jump", "-g", "--goto"):
        if flag in words:
            i = words.index(flag)
            return words[i + 1] if i + 1 < len(words) else ""
    return None


def check_jumps(text: str) -> list[str]:
    """Problems that would make iptables-restore refuse the text or leave a dead end: a rule appended to
    a chain its table does not declare, a jump to a chain its table does not declare, a table without
    COMMIT. Empty when all is well."""
    problems: list[str] = []
    table: str | None = None
    declared: set[str] = set()
    builtins = {"nat": set(NAT_BUILTINS), "filter": set(FILTER_BUILTINS),
                "mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
                "raw": {"PREROUTING", "OUTPUT"}}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if table is not None:
                problems.append(f"line {number}: table {table} has no COMMIT before *{line[1:]}")
            table, declared = line[1:], set()
            continue
        if table is None:
            problems.append(f"line {number}: outside any table: {line}")
            continue
        if line == "COMMIT":
            table = None
            continue
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name in declared:
                problems.append(f"line {number}: {table}: chain {name} declared twice")
            declared.add(name)
            continue
        if line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            if chain not in declared and chain not in builtins.get(table, set()):
                problems.append(f"line {number}: {table}: rule in undeclared chain {chain}")
            target = _jump(rest[0] if rest else "")
            if target is not None and target not in TARGETS and target not in declared:
                kind = "built-in chain" if target in builtins.get(table, set()) else "undeclared chain"
                problems.append(f"line {number}: {table}: {chain} jumps to {kind} {target}")
            continue
        problems.append(f"line {number}: {table}: not a chain or -A line: {line}")
    if table is not None:
        problems.append(f"table {table} has no COMMIT")
    return problems
