/* Contract between PID 1 (init.c) and the guest agent (agent.c). */
#ifndef HYPEMAN_AGENT_H
#define HYPEMAN_AGENT_H

/* Serve the agent protocol on the virtio-serial port (or any byte stream) open at fd.
 * Returns only on an unrecoverable error; the caller decides what to do then. */
int agent_serve(int fd);

/* Name of the virtio-serial port the host connects to. */
#define AGENT_PORT_NAME "org.hypeman.agent"

#endif
