"""The kubelet's role: pod sandboxes (the pause process holding a pod's namespaces), starting and entering
containers, and reporting which pods run (what the endpoints controller reads)."""
