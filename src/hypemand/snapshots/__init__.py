"""Snapshots: sparse copies, content digests and compression of guest memory files.

The modules here are pure and blocking; the server calls them from worker threads.
"""
