/* Minimal IPv4 interface setup for PID 1 (ioctl based: no netlink library needed). */
#ifndef HYPEMAN_NETCONF_H
#define HYPEMAN_NETCONF_H

#include <stddef.h>

/* Set IFF_UP on an interface. Returns 0, or -1 with a reason in err. */
int netconf_link_up(const char *ifname, char *err, size_t errlen);

/* Poll /sys/class/net/<ifname> until it exists. Returns 0, or -1 after timeout_ms. */
int netconf_wait_for_link(const char *ifname, int timeout_ms);

/* Address ip/prefix on ifname, bring it up, default route via gateway (may be NULL). */
int netconf_ipv4(const char *ifname, const char *ip, int prefix, const char *gateway, char *err, size_t errlen);

#endif
