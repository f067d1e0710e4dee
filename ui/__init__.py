"""`lab ui`: a local web page of a running lab (the live diagram, inspection, step-through traces, grading)."""
