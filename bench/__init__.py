"""Benchmark of the ots service: throughput against its KDF ceiling, and behaviour under overload.

Run it from the repository root with `python -m bench` (full) or `python -m bench --quick`.
It starts every server it talks to as a subprocess on 127.0.0.1 and sends traffic to
nothing else.
"""
