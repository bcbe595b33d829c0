"""`python -m bench`: the headline benchmarks (see each module for its own options)."""

from __future__ import annotations

import asyncio

from bench.boot import main

if __name__ == "__main__":
    asyncio.run(main())
