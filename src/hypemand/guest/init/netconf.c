#include "netconf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
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
