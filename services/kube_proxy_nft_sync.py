"""kube-proxy's nftables mode, synced incrementally: a change costs what changed, not the number of services.

kube-proxy's nftables proxier writes, on a partial sync, only the changed services' chains and map elements
(a full sync every hour and after a failure). The same here:

- In the process that made the last sync (kube-proxy is a daemon; `lab bench services` measures that case)
  the node's rules are kept as the list of per-service-port contributions (services/kube_proxy_nftables.py
  `parts`, shared while a port is unchanged): the next sync compares the two lists by identity and renders
  the difference of the changed ports alone (their elements, chains and affinity sets). It goes to the
  kernel as ONE nfnetlink batch from this process (services/nft_netlink.py: no `nft` process, whose cache
  fill reads the whole table first, ~0.1 s at 10,000 services), carrying the generation id the sync read,
  so the kernel refuses it whole if anything committed meanwhile; what the batch does not encode (the
  egress table, a changed base chain) goes as one `nft -f` of render_delta; any failure: a full load.
- The kernel must hold what was loaded last: the namespace's nf_tables generation id (bumped by every commit
  to any table of the namespace, see kube_proxy_partial.nft_generation) is read after each load and kept;
  when it has moved (someone changed a table by hand, or another of the lab's tables was reloaded) the table
  is replaced whole, which also repairs a hand edit. So is it after a sync that was interrupted between the
  load and saving what it loaded (a marker file lives while a load is under way).
- What was loaded is saved for the next process (`lab apply` is one): the whole ruleset as JSON, then a
  journal of the changes since (the old and new contributions of each partial sync), replayed on reading;
  the next process that renders everything anyway writes the whole ruleset again.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import compress
from pathlib import Path

from services import kube_proxy_nftables as nft
from services import nft_netlink
from services.endpoints import ServicePortEndpoints
from services.kube_proxy_partial import journal_path, nft_generation, pending_path, saved_files
from topo.errors import ApplyError
from topo.model import Cluster, Node

JOURNAL_MAX = 1 << 20  # bytes of journal before the next whole save


@dataclass
class _Loaded:
    fixed: tuple  # (node, cluster)
    parts: list
    files: tuple
    generation: int | None


_LOADED: dict[str, _Loaded] = {}
_STATIC = frozenset(c.name for c in nft._static_chains())


def replace_parts(rs: nft.Ruleset, old: nft.Ruleset, new: nft.Ruleset) -> nft.Ruleset:
    """`rs` with what `old` contributes taken out and what `new` contributes put in (chains, elements, sets)."""
    chains = {c.name: c for c in rs.chains}
    for c in old.chains:
        if c.name not in _STATIC:
            chains.pop(c.name, None)
    chains.update((c.name, c) for c in new.chains if c.name not in _STATIC)
    maps = []
    for m, m_old, m_new in zip(rs.maps, old.maps, new.maps):
        elements = dict(m.elements)
        for k, _ in m_old.elements:
            elements.pop(k, None)
        elements.update(m_new.elements)
        maps.append(replace(m, elements=tuple(elements.items())))
    sets = {s.name: s for s in rs.sets}
    for s in old.sets:
        sets.pop(s.name, None)
    sets.update((s.name, s) for s in new.sets)
    return nft.Ruleset(tuple(chains.values()), tuple(maps), tuple(sets.values()), new.egress)


def read_saved(saved: Path) -> tuple[nft.Ruleset | None, int | None]:
    """The ruleset last loaded and the generation read right after loading it; (None, None) if unknown."""
    try:
        data = json.loads(saved.read_text())
        rs, generation = nft.from_json(data), data.get("generation")
        journal = journal_path(saved)
        if journal.exists():
            for line in journal.read_text().splitlines():
                record = json.loads(line)
                rs = replace_parts(rs, nft.from_json(record["old"]), nft.from_json(record["new"]))
                generation = record.get("generation")
        return rs, generation
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _save_whole(saved: Path, rs: nft.Ruleset, generation: int | None) -> None:
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(saved.name + ".tmp")
    tmp.write_text(json.dumps({**nft.to_json(rs), "generation": generation}))
    tmp.replace(saved)
    journal_path(saved).unlink(missing_ok=True)


def sync(ns: str, node: Node, sps: list[ServicePortEndpoints], cluster: Cluster, saved: Path,
         load: Callable[[str], None]) -> str:
    """Bring one node's kube-proxy table to these service ports; `load(script)` runs `nft -f`. Returns "full",
    "partial" or "none"."""
    key = str(saved)
    memory = _LOADED.pop(key, None)
    pending = pending_path(saved)
    interrupted = pending.exists()
    now_parts = nft.parts(node, sps, cluster)
    generation = nft_generation(ns)
    fixed = (node, cluster)
    delta: tuple[nft.Ruleset, nft.Ruleset] | None = None  # (old, new) the kernel must go from and to
    script: str | None = None  # the delta as `nft -f` text, once rendered (kept for the nft -f fallback)
    record = None
    whole: nft.Ruleset | None = None
    if interrupted or generation is None:
        pass  # a full load
    elif (memory is not None and memory.files == saved_files(saved) and memory.generation == generation
          and memory.fixed == fixed):
        old_ids, new_ids = set(map(id, memory.parts)), set(map(id, now_parts))
        if old_ids == new_ids:
            _LOADED[key] = replace(memory, parts=now_parts)
            return "none"
        gone = list(compress(memory.parts, map((old_ids - new_ids).__contains__, map(id, memory.parts))))
        fresh = list(compress(now_parts, map((new_ids - old_ids).__contains__, map(id, now_parts))))
        delta = record = (nft.assemble(node, cluster, gone), nft.assemble(node, cluster, fresh))
    else:
        whole = nft.assemble(node, cluster, now_parts)
        old, old_generation = read_saved(saved)
        if old is not None and old_generation == generation:
            delta = (old, whole)
            script = nft.render_delta(old, whole)
            if not script:
                _LOADED[key] = _Loaded(fixed, now_parts, saved_files(saved), generation)
                return "none"
    saved.parent.mkdir(parents=True, exist_ok=True)
    pending.write_text("")
    how = "partial"
    try:
        if delta is None:
            raise ApplyError("no saved state matching the kernel")
        try:  # one netlink batch from here, refused by the kernel if the generation moved
            nft_netlink.apply_delta(ns, *delta, generation)
        except nft_netlink.Unsupported:  # e.g. the egress table: nft -f renders those
            script = script if script is not None else nft.render_delta(*delta)
            if script:
                load(script)
    except ApplyError:
        whole = whole if whole is not None else nft.assemble(node, cluster, now_parts)
        load(nft.render_full(whole))
        how, record = "full", None
    after = nft_generation(ns)
    journal = journal_path(saved)
    if record is not None and (journal.stat().st_size if journal.exists() else 0) < JOURNAL_MAX:
        with journal.open("a") as fh:
            fh.write(json.dumps({"old": nft.to_json(record[0]), "new": nft.to_json(record[1]),
                                 "generation": after}) + "\n")
    else:
        _save_whole(saved, whole if whole is not None else nft.assemble(node, cluster, now_parts), after)
    pending.unlink()
    _LOADED[key] = _Loaded(fixed, now_parts, saved_files(saved), after)
    return how
