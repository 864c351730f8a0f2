"""Analysis: fidelity, cost, and (later) probes and the run report."""
