"""Explicit-loop twins: plain scalar loops in float64 with `math.fsum`, the oracle route."""
