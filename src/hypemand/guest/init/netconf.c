#include "netconf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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

static int add_default_route(int sock, const char *ifname, uint32_t gateway_be, char *err, size_t errlen)
{
    struct rtentry route;
    memset(&route, 0, sizeof(route));
    struct sockaddr_in *dst = (struct sockaddr_in *)&route.rt_dst;
    struct sockaddr_in *gw = (struct sockaddr_in *)&route.rt_gateway;
    struct sockaddr_in *mask = (struct sockaddr_in *)&route.rt_genmask;
    dst->sin_family = gw->sin_family = mask->sin_family = AF_INET;
    gw->sin_addr.s_addr = gateway_be;
    route.rt_flags = RTF_UP | RTF_GATEWAY;
    route.rt_dev = (char *)ifname;
    if (ioctl(sock, SIOCADDRT, &route) != 0 && errno != EEXIST) {
        char text[INET_ADDRSTRLEN] = "?";
        inet_ntop(AF_INET, &gateway_be, text, sizeof(text));
        snprintf(err, errlen, "default route via %s: %s", text, strerror(errno));
        return -1;
    }
    return 0;
}

/* Address ip_be/prefix on ifname (SIOCSIFADDR replaces the interface's primary address), up,
 * and the default route via gateway_be unless it is 0. */
static int set_ipv4(int sock, const char *ifname, uint32_t ip_be, int prefix, uint32_t gateway_be, char *err,
                    size_t errlen)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    struct sockaddr_in *addr = (struct sockaddr_in *)&ifr.ifr_addr;
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = ip_be;
    char text[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &ip_be, text, sizeof(text));
    if (ioctl(sock, SIOCSIFADDR, &ifr) != 0) {
        snprintf(err, errlen, "%s: set address %s: %s", ifname, text, strerror(errno));
        return -1;
    }
    struct sockaddr_in *mask = (struct sockaddr_in *)&ifr.ifr_netmask;
    memset(mask, 0, sizeof(*mask));
    mask->sin_family = AF_INET;
    mask->sin_addr.s_addr = prefix == 0 ? 0 : htonl(0xFFFFFFFFu << (32 - prefix));
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) != 0) {
        snprintf(err, errlen, "%s: set netmask /%d: %s", ifname, prefix, strerror(errno));
        return -1;
    }
    if (link_up_fd(sock, ifname, err, errlen) != 0)
        return -1;
    return gateway_be ? add_default_route(sock, ifname, gateway_be, err, errlen) : 0;
}

int netconf_ipv4(const char *ifname, const char *ip, int prefix, const char *gateway, char *err, size_t errlen)
{
    struct in_addr ip_addr, gateway_addr = {0};
    if (inet_pton(AF_INET, ip, &ip_addr) != 1) {
        snprintf(err, errlen, "bad address %s", ip);
        return -1;
    }
    if (gateway && gateway[0] && inet_pton(AF_INET, gateway, &gateway_addr) != 1) {
        snprintf(err, errlen, "bad gateway %s", gateway);
        return -1;
    }
    int sock = with_socket();
    if (sock < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int rc = set_ipv4(sock, ifname, ip_addr.s_addr, prefix, gateway_addr.s_addr, err, errlen);
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

/* Whether the link has a carrier: "0" while the host keeps the NIC unplugged (a fork waiting for
 * its identity), when nobody would hear a frame. Unknown counts as yes. */
static int has_carrier(const char *ifname)
{
    char path[128], value = '1';
    snprintf(path, sizeof(path), "/sys/class/net/%s/carrier", ifname);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &value, 1) != 1)
            value = '1';
        close(fd);
    }
    return value != '0';
}

/* Gratuitous ARP (a request for our own address, broadcast): neighbours that cached another
 * MAC for addr_be (QEMU's user network keeps one per guest IP and never asks again; bridges and
 * switches learn from any frame) move to ours, so inbound traffic is not sent into the void
 * until the guest happens to ARP itself. Waits up to 2 s for the link to be running (operstate up)
 * after it was brought up again, since a frame sent before that is silently dropped; without a
 * carrier there is no one to tell, and nothing is sent. */
static int announce(int sock, const char *ifname, const unsigned char mac[6], uint32_t addr_be)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (!has_carrier(ifname))
        return 0;
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

/* The change with the link taken down and up again, for a driver that cannot change its address
 * live (see netconf_set_mac). */
static int set_mac_down_up(int sock, const char *ifname, const unsigned char mac[6], int readdressing, char *err,
                           size_t errlen)
{
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
    /* Routes the caller replaces next need not be kept. */
    size_t route_count =
        (flags & IFF_UP) && !readdressing ? save_routes(ifname, addr_be, mask_be, routes, SAVED_ROUTES_MAX) : 0;

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
    if (!failed && has_addr && !readdressing && announce(sock, ifname, mac, addr_be) != 0) {
        failed = errno;
        snprintf(err, errlen, "%s: announce the new address (gratuitous ARP): %s", ifname, strerror(failed));
    }
out:
    if (failed) {
        errno = failed;
        return -1;
    }
    return 0;
}

/* IPv6 on ifname, from its disable_ipv6 sysctl: 1 enabled, 0 disabled, -1 unknown (no IPv6, or no
 * /proc/sys). */
static int ipv6_enabled(const char *ifname)
{
    char path[96], value = '?';
    snprintf(path, sizeof(path), "/proc/sys/net/ipv6/conf/%s/disable_ipv6", ifname);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (read(fd, &value, 1) != 1)
        value = '?';
    close(fd);
    return value == '0' ? 1 : value == '1' ? 0 : -1;
}

static int set_ipv6_disabled(const char *ifname, int disabled)
{
    char path[96];
    snprintf(path, sizeof(path), "/proc/sys/net/ipv6/conf/%s/disable_ipv6", ifname);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t written = write(fd, disabled ? "1" : "0", 1);
    int saved = errno;
    close(fd);
    errno = saved;
    return written == 1 ? 0 : -1;
}

int netconf_set_mac(const char *ifname, const unsigned char mac[6], int readdressing, char *err, size_t errlen)
{
    int sock = with_socket();
    if (sock < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int rc;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) {
        int failed = errno;
        snprintf(err, errlen, "%s: get flags: %s", ifname, strerror(failed));
        close(sock);
        errno = failed;
        return -1;
    }
    if (ifr.ifr_flags & IFF_UP) {
        /* Live, where the driver can (virtio-net can): the link, its routes and its IPv4 address
         * stay; the kernel itself forgets the neighbours learnt with the old MAC. IPv6 is turned
         * off on the interface meanwhile, so that its link-local address (derived from the old
         * MAC) goes and is made anew from the new one, as after a link down and up (at once with
         * a carrier, else when the carrier comes). */
        int ipv6 = ipv6_enabled(ifname) == 1;
        if (ipv6 && set_ipv6_disabled(ifname, 1) != 0)
            ipv6 = 0;
        memset(&ifr.ifr_hwaddr, 0, sizeof(ifr.ifr_hwaddr));
        ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
        memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
        int live = ioctl(sock, SIOCSIFHWADDR, &ifr) == 0;
        if (ipv6 && set_ipv6_disabled(ifname, 0) != 0 && live) {
            int failed = errno;
            snprintf(err, errlen, "%s: turn IPv6 on again: %s", ifname, strerror(failed));
            close(sock);
            errno = failed;
            return -1;
        }
        if (live) {
            rc = 0;
            struct ifreq addr = ifr;
            if (!readdressing && ioctl(sock, SIOCGIFADDR, &addr) == 0) {
                uint32_t addr_be = ((struct sockaddr_in *)&addr.ifr_addr)->sin_addr.s_addr;
                if (announce(sock, ifname, mac, addr_be) != 0) {
                    int failed = errno;
                    snprintf(err, errlen, "%s: announce the new address (gratuitous ARP): %s", ifname,
                             strerror(failed));
                    rc = -1;
                    errno = failed;
                }
            }
            close(sock);
            return rc;
        }
        /* Refused (EBUSY: a driver that needs the link down): the old way, which reports a
         * failure of its own. */
    }
    rc = set_mac_down_up(sock, ifname, mac, readdressing, err, errlen);
    int saved = errno;
    close(sock);
    errno = saved;
    return rc;
}

/* ---------- a new IPv4 address ---------- */

#define ADDRESSES_MAX 64

/* Delete every IPv4 address labelled ifname: SIOCSIFADDR with 0.0.0.0 deletes the first one
 * (what `ifconfig eth0 0.0.0.0` does), repeated while SIOCGIFADDR still finds one. Returns how
 * many went, or -1. */
static int remove_addresses(int sock, const char *ifname, char *err, size_t errlen)
{
    for (int i = 0; i < ADDRESSES_MAX; i++) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof(ifr));
        snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
        if (ioctl(sock, SIOCGIFADDR, &ifr) != 0) {
            if (errno == EADDRNOTAVAIL)
                return i; /* none left */
            snprintf(err, errlen, "%s: get address: %s", ifname, strerror(errno));
            return -1;
        }
        struct sockaddr_in *addr = (struct sockaddr_in *)&ifr.ifr_addr;
        addr->sin_family = AF_INET;
        addr->sin_addr.s_addr = 0;
        if (ioctl(sock, SIOCSIFADDR, &ifr) != 0) {
            snprintf(err, errlen, "%s: remove the old address: %s", ifname, strerror(errno));
            return -1;
        }
    }
    snprintf(err, errlen, "%s: more than %d addresses", ifname, ADDRESSES_MAX);
    errno = EMLINK;
    return -1;
}

/* Default routes through ifname, whichever gateway and metric they have: SIOCDELRT naming only
 * the destination 0.0.0.0/0 and the device matches any of them (what `route del default dev` does);
 * repeated until there is none (ESRCH). */
static int remove_default_routes(int sock, const char *ifname, char *err, size_t errlen)
{
    for (int i = 0; i < SAVED_ROUTES_MAX; i++) {
        struct rtentry route;
        memset(&route, 0, sizeof(route));
        struct sockaddr_in *dst = (struct sockaddr_in *)&route.rt_dst;
        struct sockaddr_in *gw = (struct sockaddr_in *)&route.rt_gateway;
        struct sockaddr_in *mask = (struct sockaddr_in *)&route.rt_genmask;
        dst->sin_family = gw->sin_family = mask->sin_family = AF_INET;
        route.rt_flags = RTF_UP;
        route.rt_dev = (char *)ifname;
        if (ioctl(sock, SIOCDELRT, &route) != 0) {
            if (errno == ESRCH)
                return 0;
            snprintf(err, errlen, "%s: remove the old default route: %s", ifname, strerror(errno));
            return -1;
        }
    }
    snprintf(err, errlen, "%s: more than %d default routes", ifname, SAVED_ROUTES_MAX);
    errno = EMLINK;
    return -1;
}

/* The next whitespace-separated field of *p (NUL-terminated in place), or NULL at the end of the line. */
static char *next_field(char **p)
{
    char *s = *p;
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '\0' || *s == '\n')
        return NULL;
    char *start = s;
    while (*s && *s != ' ' && *s != '\t' && *s != '\n')
        s++;
    if (*s == ' ' || *s == '\t')
        *s++ = '\0';
    *p = s;
    return start;
}

/* Forget every neighbour (ARP) entry of ifname, from /proc/net/arp, one SIOCDARP each. Read and
 * split by hand, not with stdio's scanf: in a guest just restored under TCG every code path runs
 * for the first time, and scanf's alone costs tens of milliseconds there. */
static int flush_neighbours(int sock, const char *ifname, char *err, size_t errlen)
{
    static char text[16384];
    int fd = open("/proc/net/arp", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "/proc/net/arp: %s", strerror(errno));
        return -1;
    }
    size_t used = 0;
    ssize_t got;
    while (used < sizeof(text) - 1 && (got = read(fd, text + used, sizeof(text) - 1 - used)) > 0)
        used += (size_t)got;
    close(fd);
    text[used] = '\0';
    char *line = strchr(text, '\n'); /* after the header */
    while (line && *++line) {
        char *end = strchr(line, '\n');
        if (end)
            *end = '\0';
        char *cursor = line, *fields[6];
        int count = 0;
        while (count < 6 && (fields[count] = next_field(&cursor)) != NULL)
            count++;
        line = end;
        if (count != 6 || strcmp(fields[5], ifname) != 0)
            continue;
        struct arpreq req;
        memset(&req, 0, sizeof(req));
        struct sockaddr_in *pa = (struct sockaddr_in *)&req.arp_pa;
        pa->sin_family = AF_INET;
        if (inet_pton(AF_INET, fields[0], &pa->sin_addr) != 1)
            continue;
        snprintf(req.arp_dev, sizeof(req.arp_dev), "%s", ifname);
        if (ioctl(sock, SIOCDARP, &req) != 0 && errno != ENXIO) {
            snprintf(err, errlen, "%s: forget the neighbour %s: %s", ifname, fields[0], strerror(errno));
            return -1;
        }
        if (!line)
            break;
    }
    return 0;
}

int netconf_readdress(const char *ifname, uint32_t ip_be, int prefix, uint32_t gateway_be, char *err, size_t errlen)
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
    if (remove_default_routes(sock, ifname, err, errlen) != 0)
        goto out;
    int removed = remove_addresses(sock, ifname, err, errlen);
    if (removed < 0 || set_ipv4(sock, ifname, ip_be, prefix, gateway_be, err, errlen) != 0)
        goto out;
    /* Removing an interface's last IPv4 address makes the kernel forget all its neighbours
     * (fib_disable_ip -> arp_ifdown), whatever their state: only an interface that had none to
     * remove needs its table read. */
    if (removed == 0 && flush_neighbours(sock, ifname, err, errlen) != 0)
        goto out;
    if (ioctl(sock, SIOCGIFHWADDR, &ifr) != 0) {
        snprintf(err, errlen, "%s: get hardware address: %s", ifname, strerror(errno));
        goto out;
    }
    if (announce(sock, ifname, (const unsigned char *)ifr.ifr_hwaddr.sa_data, ip_be) != 0) {
        snprintf(err, errlen, "%s: announce the new address (gratuitous ARP): %s", ifname, strerror(errno));
        goto out;
    }
    rc = 0;
out:
    if (rc != 0 && errno == 0)
        errno = EIO;
    {
        int saved = errno;
        close(sock);
        errno = saved;
    }
    return rc;
}
