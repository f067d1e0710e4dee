"""Graded exercises, the conformance-test role: an exercise's checks.yaml (read and checked strictly), the
probes that look at a running lab, the faults an exercise breaks it with, and `lab grade`."""
