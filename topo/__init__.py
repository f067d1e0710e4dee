"""Topology layer: the lab spec, its validated model, the Mininet nodes and the underlay.

Everything above (cni, routing, services, lab) depends on this package; it depends on nothing of theirs.
"""
