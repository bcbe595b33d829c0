"""How long the host waits for the guest agent, in one place.

The agent's loop never blocks (file requests run in worker processes, see ``README.md``), so an
answer that does not come means the guest is frozen (paused on an I/O error, stuck in the kernel)
or a worker is stuck on a hung mount. These bounds turn that into ``AgentTimeout`` (504
``agent_timeout``) instead of a call that never returns. Each is far above what a working guest
needs under TCG on a busy 2-core host (requests answer in milliseconds there, a worker's fork
included), so only a broken guest reaches them.

Nothing bounds what the guest is not obliged to send: output of a running process (an idle
interactive shell is fine) and credit for its stdin (a process need not read it). A long-running
exec is watched instead: after ``EXEC_LIVENESS_INTERVAL`` without a frame the agent is pinged, and
only a ping that gets no answer fails the exec.
"""

from __future__ import annotations

# Request/response calls: stat, mkdir, symlink, set_clock, set_identity, ping, and an exec's
# STARTED. The slowest is an identity with a new MAC (eth0 down and up, routes, a gratuitous ARP),
# well under a second even under TCG.
REQUEST_TIMEOUT = 20.0

# A stream the guest is feeding (a cp from the guest, the answers and credit of a cp to it): no
# frame for this long while the host waits for one. Above the agent's own limit for a file that
# gives no data (GET_IDLE_READ_MS in agent.c, 5 s), so its precise error arrives first; this is the
# backstop for a read stuck in the kernel (a hung NFS or FUSE mount), which nothing in the guest
# can interrupt.
STREAM_IDLE_TIMEOUT = 30.0

# An exec that has sent nothing for this long gets a ping (answered within REQUEST_TIMEOUT or the
# exec fails). A process past its own time limit (the exec's ``timeout``) that the guest has still
# not reported after this long fails too: the guest kills it at the limit.
EXEC_LIVENESS_INTERVAL = 30.0
