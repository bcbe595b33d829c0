#include "netconf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/if_ether.h>
#include <netinet/in.h>
#include <netpacket/packet.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int set_addr(struct sockaddr *sa, const char *text)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;
    memset(sin, 0, sizeof(*sin));
    sin->sin_family = AF_INET;
    return inet_pton(AF_INET, text, &sin->sin_addr) == 1 ? 0 : -1;
}

static int with_socket(void)
{
    return socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
}

static int link_up_fd(int sock, const char *ifname, char *err, size_t errlen)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) {
        snprintf(err, errlen, "%s: get flags: %s", ifname, strerror(errno));
        return -1;
    }
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0) {
        snprintf(err, errlen, "%s: set up: %s", ifname, strerror(errno));
        return -1;
    }
    return 0;
}

int netconf_link_up(const char *ifname, char *err, size_t errlen)
{
    int sock = with_socket();
    if (sock < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int rc = link_up_fd(sock, ifname, err, errlen);
    close(sock);
    return rc;
}

int netconf_wait_for_link(const char *ifname, int timeout_ms)
{
    char path[128];
    snprintf(path, sizeof(path), "/sys/class/net/%s", ifname);
    for (int waited = 0; waited <= timeout_ms; waited += 2) {
        if (access(path, F_OK) == 0)
            return 0;
        struct timespec ts = {0, 2000000L};
        nanosleep(&ts, NULL);
    }
    return -1;
}

int netconf_ipv4(const char *ifname, const char *ip, int prefix, const char *gateway, char *err, size_t errlen)
{
    int sock = with_socket();
    if (sock < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int rc = -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (set_addr(&ifr.ifr_addr, ip) != 0) {
        snprintf(err, errlen, "bad address %s", ip);
        goto out;
    }
    if (ioctl(sock, SIOCSIFADDR, &ifr) != 0) {
        snprintf(err, errlen, "%s: set address %s: %s", ifname, ip, strerror(errno));
        goto out;
    }
    struct sockaddr_in *mask = (struct sockaddr_in *)&ifr.ifr_netmask;
    memset(mask, 0, sizeof(*mask));
    mask->sin_family = AF_INET;
    mask->sin_addr.s_addr = prefix == 0 ? 0 : htonl(0xFFFFFFFFu << (32 - prefix));
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) != 0) {
        snprintf(err, errlen, "%s: set netmask /%d: %s", ifname, prefix, strerror(errno));
        goto out;
    }
    if (link_up_fd(sock, ifname, err, errlen) != 0)
        goto out;
    if (gateway && gateway[0]) {
        struct rtentry route;
        memset(&route, 0, sizeof(route));
        set_addr(&route.rt_dst, "0.0.0.0");
        set_addr(&route.rt_genmask, "0.0.0.0");
        if (set_addr(&route.rt_gateway, gateway) != 0) {
            snprintf(err, errlen, "bad gateway %s", gateway);
            goto out;
        }
        route.rt_flags = RTF_UP | RTF_GATEWAY;
        route.rt_dev = (char *)ifname;
        if (ioctl(sock, SIOCADDRT, &route) != 0 && errno != EEXIST) {
            snprintf(err, errlen, "default route via %s: %s", gateway, strerror(errno));
            goto out;
        }
    }
    rc = 0;
out:
    close(sock);
    return rc;
}

/* ---------- hardware address change ---------- */

#define SAVED_ROUTES_MAX 32

struct saved_route {
    uint32_t dst, gateway, mask; /* network byte order, as /proc/net/route prints them */
    unsigned flags, metric;
};

/* The main table's routes through ifname, except the prefix route of its own address (addr/mask,
 * 0 if it has none): the kernel adds that one again when the link comes up. */
static size_t save_routes(const char *ifname, uint32_t addr, uint32_t mask, struct saved_route *out, size_t cap)
{
    FILE *f = fopen("/proc/net/route", "re");
    if (!f)
        return 0;
    char line[256];
    size_t n = 0;
    if (fgets(line, sizeof(line), f)) { /* header */
        while (n < cap && fgets(line, sizeof(line), f)) {
            char name[IFNAMSIZ + 1];
            unsigned dst, gw, flags, refcnt, use, metric, rmask;
            if (sscanf(line, "%16s %x %x %x %u %u %u %x", name, &dst, &gw, &flags, &refcnt, &use, &metric,
                       &rmask) != 8 ||
                strcmp(name, ifname) != 0 || !(flags & RTF_UP))
                continue;
            if (!(flags & RTF_GATEWAY) && mask && rmask == mask && dst == (addr & mask))
                continue;
            out[n++] = (struct saved_route){dst, gw, rmask, flags, metric};
        }
    }
    fclose(f);
    return n;
}

static int restore_route(int sock, const char *ifname, const struct saved_route *saved)
{
    struct rtentry route;
    memset(&route, 0, sizeof(route));
    struct sockaddr_in *dst = (struct sockaddr_in *)&route.rt_dst;
    struct sockaddr_in *gw = (struct sockaddr_in *)&route.rt_gateway;
    struct sockaddr_in *mask = (struct sockaddr_in *)&route.rt_genmask;
    dst->sin_family = gw->sin_family = mask->sin_family = AF_INET;
    dst->sin_addr.s_addr = saved->dst;
    gw->sin_addr.s_addr = saved->gateway;
    mask->sin_addr.s_addr = saved->mask;
    route.rt_flags = (unsigned short)(saved->flags & (RTF_UP | RTF_GATEWAY | RTF_HOST));
    route.rt_metric = (short)(saved->metric + 1); /* the kernel stores rt_metric - 1 (as route(8) knows) */
    route.rt_dev = (char *)ifname;
    return ioctl(sock, SIOCADDRT, &route) == 0 || errno == EEXIST ? 0 : -1;
}

/* Gratuitous ARP (a request for our own address, broadcast): neighbours that cached the old
 * MAC for addr_be (QEMU's user network keeps one per guest IP and never asks again; bridges and
 * switches learn from any frame) move to the new one, so inbound traffic is not sent into the void
 * until the guest happens to ARP itself. Waits up to 2 s for the link to be running (operstate up)
 * after it was brought up again, since a frame sent before that is silently dropped. */
static int announce(int sock, const char *ifname, const unsigned char mac[6], uint32_t addr_be)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    for (int waited = 0; waited < 2000; waited += 5) {
        if (ioctl(sock, SIOCGIFFLAGS, &ifr) == 0 && (ifr.ifr_flags & IFF_RUNNING))
            break;
        struct timespec ts = {0, 5000000L};
        nanosleep(&ts, NULL);
    }
    unsigned index = if_nametoindex(ifname);
    if (!index)
        return -1;
    int psock = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0); /* protocol 0: send only */
    if (psock < 0)
        return -1;
    unsigned char frame[60]; /* the Ethernet minimum; the ARP part is 42 bytes */
    memset(frame, 0, sizeof(frame));
    memset(frame, 0xff, ETH_ALEN);                             /* destination: broadcast */
    memcpy(frame + 6, mac, ETH_ALEN);                          /* source */
    frame[12] = ETH_P_ARP >> 8, frame[13] = ETH_P_ARP & 0xff;  /* ethertype */
    frame[14] = 0, frame[15] = 1;                              /* hardware: Ethernet */
    frame[16] = 0x08, frame[17] = 0x00;                        /* protocol: IPv4 */
    frame[18] = ETH_ALEN, frame[19] = 4;                       /* address lengths */
    frame[20] = 0, frame[21] = 1;                              /* request */
    memcpy(frame + 22, mac, ETH_ALEN);                         /* sender MAC */
    memcpy(frame + 28, &addr_be, 4);                           /* sender IP */
    memcpy(frame + 38, &addr_be, 4);                           /* target IP = sender IP; target MAC 0 */
    struct sockaddr_ll to;
    memset(&to, 0, sizeof(to));
    to.sll_family = AF_PACKET;
    to.sll_protocol = htons(ETH_P_ARP);
    to.sll_ifindex = (int)index;
    to.sll_halen = ETH_ALEN;
    memset(to.sll_addr, 0xff, ETH_ALEN);
    ssize_t sent = sendto(psock, frame, sizeof(frame), 0, (struct sockaddr *)&to, sizeof(to));
    int saved = errno;
    close(psock);
    errno = saved;
    return sent == (ssize_t)sizeof(frame) ? 0 : -1;
}

int netconf_set_mac(const char *ifname, const unsigned char mac[6], char *err, size_t errlen)
{
    int sock = with_socket();
    if (sock < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int failed = 0; /* errno of the first failure */
    struct ifreq ifr, addr, mask;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    addr = mask = ifr;
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) {
        failed = errno;
        snprintf(err, errlen, "%s: get flags: %s", ifname, strerror(failed));
        goto out;
    }
    short flags = ifr.ifr_flags;
    int has_addr = ioctl(sock, SIOCGIFADDR, &addr) == 0 && ioctl(sock, SIOCGIFNETMASK, &mask) == 0;
    uint32_t addr_be = has_addr ? ((struct sockaddr_in *)&addr.ifr_addr)->sin_addr.s_addr : 0;
    uint32_t mask_be = has_addr ? ((struct sockaddr_in *)&mask.ifr_netmask)->sin_addr.s_addr : 0;
    struct saved_route routes[SAVED_ROUTES_MAX];
    size_t route_count = (flags & IFF_UP) ? save_routes(ifname, addr_be, mask_be, routes, SAVED_ROUTES_MAX) : 0;

    if (flags & IFF_UP) {
        ifr.ifr_flags = (short)(flags & ~IFF_UP);
        if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0) {
            failed = errno;
            snprintf(err, errlen, "%s: set down: %s", ifname, strerror(failed));
            goto out;
        }
    }
    memset(&ifr.ifr_hwaddr, 0, sizeof(ifr.ifr_hwaddr));
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
    if (ioctl(sock, SIOCSIFHWADDR, &ifr) != 0) {
        failed = errno;
        snprintf(err, errlen, "%s: set hardware address: %s", ifname, strerror(failed));
        /* go on: the link must come back up with its old address */
    }
    if (!(flags & IFF_UP))
        goto out;
    ifr.ifr_flags = flags;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0) {
        if (!failed) {
            failed = errno;
            snprintf(err, errlen, "%s: set up: %s", ifname, strerror(failed));
        }
        goto out;
    }
    struct ifreq now = addr;
    if (has_addr && ioctl(sock, SIOCGIFADDR, &now) != 0) {
        if (ioctl(sock, SIOCSIFADDR, &addr) != 0 || ioctl(sock, SIOCSIFNETMASK, &mask) != 0) {
            if (!failed) {
                failed = errno;
                snprintf(err, errlen, "%s: restore address: %s", ifname, strerror(failed));
            }
        }
    }
    for (size_t i = 0; i < route_count; i++) {
        if (restore_route(sock, ifname, &routes[i]) != 0 && !failed) {
            failed = errno;
            char dst[INET_ADDRSTRLEN] = "?";
            inet_ntop(AF_INET, &routes[i].dst, dst, sizeof(dst));
            snprintf(err, errlen, "%s: restore route to %s: %s", ifname, dst, strerror(failed));
        }
    }
    if (!failed && has_addr && announce(sock, ifname, mac, addr_be) != 0) {
        failed = errno;
        snprintf(err, errlen, "%s: announce the new address (gratuitous ARP): %s", ifname, strerror(failed));
    }
out:
    close(sock);
    if (failed) {
        errno = failed;
        return -1;
    }
    return 0;
}
