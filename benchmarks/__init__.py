"""Throughput, latency, start-up and memory benchmarks of workerkit against raw aio-pika and pika.

Run ``python -m benchmarks.run [--quick]``; see docs/performance.md for the latest figures.
"""
