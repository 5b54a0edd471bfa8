"""Measured numbers and the scripts that measure them; ``benchmarks.common`` is what they share."""
