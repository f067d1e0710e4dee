"""The plugin as an executable that speaks the CNI spec, so it can be driven like any real plugin.

    ip netns exec NODE env CNI_COMMAND=ADD CNI_CONTAINERID=ID CNI_NETNS=/run/netns/POD CNI_IFNAME=eth0 \
        CNI_PATH=/usr/lib/cni kubenet-cni < netconf.json

It runs in the namespace it is started in (the node's), reads the network config on stdin and prints the
result (or the spec's error object, exit 1) on stdout, as kubelet's container runtime expects.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from cni.plugin import (CNI_VERSION, INVALID_ENV, SUPPORTED_VERSIONS, VALID_ATTACHMENTS, BridgePlugin, CniArgs,
                        CniError, NetConf, ifname_problem)
from topo.errors import LabError
from topo.rtnl import Rtnl


def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(INVALID_ENV, f"{name} is not set")
    return value


def _ifname() -> str:
    """CNI_IFNAME, checked as the spec's "Parameters" section asks (a valid interface name): code 4 with
    the variable named, before anything is made."""
    value = _env("CNI_IFNAME")
    problem = ifname_problem(value)
    if problem:
        raise CniError(INVALID_ENV, f"invalid CNI_IFNAME: {problem}")
    return value


def _k8s_args(raw: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in raw.split(";") if "=" in item)
    return {k: v for k, v in pairs}


def run(command: str, stdin: str) -> dict[str, Any] | None:
    if command == "VERSION":
        return {"cniVersion": CNI_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
    try:
        config = json.loads(stdin)
    except ValueError as exc:
        raise CniError(6, "network configuration is not JSON", str(exc)) from exc
    if not isinstance(config, dict):
        raise CniError(6, "network configuration must be a JSON object")
    conf = NetConf.from_json(config)
    if command in ("STATUS", "GC"):
        # CNI SPEC.md 1.1.0 "CNI operations": STATUS and GC take only the configuration (no container,
        # namespace or interface); a configuration of an older version does not allow them (code 1).
        if conf.cni_version == "1.0.0":
            raise CniError(1, f"config version does not allow {command}", "STATUS and GC need cniVersion 1.1.0")
        with Rtnl() as host:
            plugin = BridgePlugin(conf, host)
            if command == "STATUS":
                plugin.status()
            else:
                plugin.gc(config.get(VALID_ATTACHMENTS))
        return None
    if command not in ("ADD", "DEL", "CHECK"):
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}", "expected ADD, DEL, CHECK, STATUS, GC or VERSION")
    extra = _k8s_args(os.environ.get("CNI_ARGS", ""))
    args = CniArgs(container_id=_env("CNI_CONTAINERID"), netns=_env("CNI_NETNS", required=command != "DEL"),
                   ifname=_ifname(), pod_namespace=extra.get("K8S_POD_NAMESPACE", ""),
                   pod_name=extra.get("K8S_POD_NAME", ""))
    with Rtnl() as host:
        plugin = BridgePlugin(conf, host)
        if command == "ADD":
            return plugin.add(args)
        if command == "DEL":
            plugin.delete(args)
            return None
        if command == "CHECK":
            plugin.check(args, config.get("prevResult"))
            return None
    raise AssertionError("unreachable")


def main() -> int:
    try:
        result = run(os.environ.get("CNI_COMMAND", ""), sys.stdin.read())
    except CniError as exc:
        print(json.dumps(exc.to_json()))
        return 1
    except LabError as exc:
        print(json.dumps(CniError(11, str(exc)).to_json()))
        return 1
    except Exception as exc:  # a bug or an odd input: still a CNI error object, never a bare traceback
        print(json.dumps(CniError(999, "internal error", f"{type(exc).__name__}: {exc}").to_json()))
        return 1
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
