"""The controllers' role: bringing what is derived from the desired state (service rules, NetworkPolicy
rules, DNS records, ingress routes) in line with it after every change of pods or objects."""
