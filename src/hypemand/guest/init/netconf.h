/* Minimal IPv4 interface setup for PID 1 (ioctl based: no netlink library needed). */
#ifndef HYPEMAN_NETCONF_H
#define HYPEMAN_NETCONF_H

#include <stddef.h>
#include <stdint.h>

/* Set IFF_UP on an interface. Returns 0, or -1 with a reason in err. */
int netconf_link_up(const char *ifname, char *err, size_t errlen);

/* Poll /sys/class/net/<ifname> until it exists. Returns 0, or -1 after timeout_ms. */
int netconf_wait_for_link(const char *ifname, int timeout_ms);

/* Address ip/prefix on ifname, bring it up, default route via gateway (may be NULL). */
int netconf_ipv4(const char *ifname, const char *ip, int prefix, const char *gateway, char *err, size_t errlen);

/* Give ifname the Ethernet address mac. With the link up the change is made live where the driver
 * allows it (virtio-net does): the link, its routes and IPv4 address stay, and IPv6 is turned off
 * and on again around the change so that its link-local address is made anew from the new MAC. A
 * driver that refuses (EBUSY) gets the link taken down and up: the routes through it are read from
 * /proc/net/route beforehand and added again (all but the prefix route of the interface's own
 * address, which the kernel restores itself), and the IPv4 address is set again should it be gone.
 * Unless readdressing, a gratuitous ARP then tells the neighbours (QEMU's user network among them)
 * the new MAC. readdressing: the caller replaces the address and routes next (netconf_readdress),
 * so none are kept and the old address is not announced (announcing it with the new MAC would
 * tell the network that the old address lives here, which for a fork is its source's).
 * Returns 0, or -1 with errno set and a reason in err. */
int netconf_set_mac(const char *ifname, const unsigned char mac[6], int readdressing, char *err, size_t errlen);

/* Give ifname the address ip_be/prefix instead of whatever it had (addresses in network byte
 * order): its default routes and every IPv4 address labelled ifname are removed (not kept as
 * secondaries), the new address is set, the link is up, the default route goes via gateway_be
 * (none if 0), the neighbour (ARP) cache of ifname is flushed, and a gratuitous ARP announces the
 * new address (skipped without a carrier). The caller checked the values. Stops at the first
 * failure: returns 0, or -1 with errno set and a reason in err. */
int netconf_readdress(const char *ifname, uint32_t ip_be, int prefix, uint32_t gateway_be, char *err, size_t errlen);

#endif
