"""`python -m bench`: the headline benchmarks (see each module for its own options).

This runs bench.boot. The others run as modules of their own, each printing same-run ratios:
bench.instances (create -> Running through the API, GET /instances), bench.snapshots (standby,
restore, snapshots, fork, compression on ext4 and a loop-mounted XFS), bench.compression,
bench.boot_path, bench.agent_roundtrip, bench.hypervisor_latency, bench.image_disk_formats, and
bench.network (TAP vs user-mode throughput, requests/s through the ingress's Caddy vs straight to the
VM, restore and fork with a network vs without; needs root: it makes network namespaces), and
bench.wake (time to first byte through the ingress to a Standby VM vs Running vs an explicit
restore + request; needs root), and bench.balloon (host memory a memory reclaim returns per GiB
ballooned vs QMP balloon by hand; boot and restore with the balloon device vs without), and
bench.build (a 3-layer Dockerfile built in a builder VM through the API vs buildah on the host on
the same inputs, cold and with a warm layer cache; needs root).
"""

from __future__ import annotations

import asyncio

from bench.boot import main

if __name__ == "__main__":
    asyncio.run(main())
