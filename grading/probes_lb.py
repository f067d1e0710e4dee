"""The probes that look at a Service's load balancing as a whole, apart from grading/probes.py's one-shot ones:
`http` with `spread: true` (every ready endpoint of the Service answers, through its ClusterIP, from the
source's own socket load balancer), and `lbmap` (a cilium node's service map holds every endpoint, read from
the kernel's pinned maps and compared with the Service's ready endpoints).
"""
from __future__ import annotations

from grading import schema
from grading.probe_base import Context, Result, get
from observe import targets
from topo.errors import StateError

TRIES_PER_ENDPOINT = 20  # a 3-endpoint Service picked at random misses one in 60 tries with p < 1e-10


def _endpoints(ctx: Context, service: str, port: int | None = None) -> list:
    """The ServicePortEndpoints of `service` (service/[NS/]NAME or [NS/]NAME) as the lab resolves them now."""
    from kubelet.pods import running_pods
    from services.endpoints import resolve

    name = service.removeprefix("service/")
    key = name if "/" in name else f"default/{name}"
    found = [spe for spe in resolve(ctx.lookup.lab.services, running_pods(ctx.st, ctx.lookup.lab))
             if spe.service.key == key and (port is None or spe.port.port == port)]
    if not found:
        raise StateError(f"no Service {key}" + (f" with port {port}" if port is not None else "") +
                         f" in lab {ctx.st.name}")
    return found


def spread(ctx: Context, p: schema.HttpIn, src: targets.Target, dest: str) -> Result:
    """GETs until every ready endpoint's pod name came back as a body (/hostname); any failed GET fails."""
    wanted = {e.pod.split("/", 1)[1] for spe in _endpoints(ctx, p.to, p.port) for e in spe.endpoints}
    if not wanted:
        return Result(False, f"{p.to} port {p.port} has no ready endpoint")
    seen: dict[str, int] = {}
    for _ in range(TRIES_PER_ENDPOINT * len(wanted)):
        result, body = get(ctx, p, src, dest)
        if not result.passed:
            return Result(False, f"{result.detail} (after {sum(seen.values())} good answers)")
        seen[body.strip()] = seen.get(body.strip(), 0) + 1
        if wanted <= set(seen):
            break
    counts = ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
    where = f"{sum(seen.values())} GETs of http://{dest}:{p.port}{p.path} from {src.key}: {counts}"
    missing = sorted(wanted - set(seen))
    if missing:
        return Result(False, f"{where}; never answered: {', '.join(missing)}")
    return Result(True, where)


def lbmap(ctx: Context, p: schema.LbMapIn) -> Result:
    """Every frontend of the Service in the node's pinned cilium_lb4_services_v2: slot 0 counts its ready
    endpoints, slots 1..N name exactly them, each found in cilium_lb4_backends_v3."""
    from cilium import maps
    from kubelet.pods import running_pods
    from observe import cilium

    node = ctx.lookup.live(p.on)
    if node.kind != "node" or ctx.lookup.lab.cni.profile != "cilium":
        return Result(False, f"{p.on} is not a node of a cilium lab: it has no service map")
    names = {spe.name for spe in _endpoints(ctx, p.service)}
    want = [e for e in maps.services_of(ctx.lookup.lab, running_pods(ctx.st, ctx.lookup.lab), node.name)
            if e.name in names]
    have = cilium.slots(ctx.st.name, node.name)
    wrong = []
    for entry in want:
        count, slots = have.get(entry.frontend, (None, {}))
        if count is None:
            wrong.append(f"{entry.frontend}: no frontend")
            continue
        got = sorted(str(b) if b else "<missing backend>" for b in slots.values())
        expected = sorted(str(b) for b in entry.backends)
        if got != expected or count != len(entry.backends) or sorted(slots) != list(range(1, count + 1)):
            wrong.append(f"{entry.frontend}: count {count}, slots {sorted(slots)} -> {', '.join(got) or 'none'}; "
                         f"expected {len(expected)}: {', '.join(expected) or 'none'}")
    where = f"{node.name}'s {maps.SERVICES}, {len(want)} frontends of {', '.join(sorted(names))}"
    if wrong:
        return Result(False, f"{where}: {'; '.join(wrong)}")
    return Result(True, f"{where}: every ready endpoint in its slot")
