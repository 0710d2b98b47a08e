"""Benchmarks that measure tunefleet against its baselines side by side in one run.

Every figure that ``python -m bench`` reports is a ratio between two things measured in
the same run and repeated, with the median kept, because absolute timings on shared
machines drift by more than the differences being measured.
"""
