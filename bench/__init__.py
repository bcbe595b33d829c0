"""Benchmarks: speed and memory as ratios against bare QEMU measured in the same run."""
