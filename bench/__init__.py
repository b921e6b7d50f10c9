"""Benchmark harness: mirror against distribution's own proxy mode, same machine, same run."""
