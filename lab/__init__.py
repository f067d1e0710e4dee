"""Lab layer: the `lab` CLI, a lab's lifecycle (up, down, clean), the plan and the apply path that build it,
`lab apply -f`/`lab delete`, `lab status`, `lab link` and the `lab bench` scheduler."""
