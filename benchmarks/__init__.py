"""Benchmarks (not timed tests): ``python benchmarks/peer_trl.py --help``."""
