"""TEMPORARY (remove at the merge with the topo/spec.py split): the old home of the built-in images.

The images now live in the top-level `images` package. topo/spec.py, which this branch does not edit,
still names the stand-in `lab.images.agnhost` (AGNHOST_MODULE): it imports it to check agnhost args and
runs `python -m lab.images.agnhost` in pods. This alias keeps both working until AGNHOST_MODULE says
"images.agnhost"; then delete lab/images/.
"""
