"""Topology layer: the spec checks' core (schema) and the topology's own checks, the validated model, the
Mininet nodes and the underlay.

Everything above (cni, routing, services, apiserver, lab) depends on this package; it depends on nothing of theirs.
"""
