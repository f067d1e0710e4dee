"""Reading a running lab, as a cluster operator's tools do: what the kernel holds (routes, neighbours, rules,
IPVS), the lab drawn against its spec (`lab graph`), one packet followed hop by hop (`lab trace`), probes
(`lab probe`), DNS query counts, and the names of a lab's nodes, pods and hosts. Observing never changes a lab."""
