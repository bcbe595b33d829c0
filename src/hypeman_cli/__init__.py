"""``hypeman``: a command line for Hypeman servers, built on the official Python SDK.

This package imports only the SDK (``hypeman``), typer, rich, PyYAML, httpx (an SDK dependency)
and the standard library, so it installs and runs without the server (``hypemand``).
"""

__version__ = "0.1.0"
