/* Bounds-checked parser of the config disk written by hypemand/guest/config_disk.py. */
#include "config_disk.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get_u16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

/* CRC-32 (IEEE 802.3, as zlib.crc32). Bitwise: the payload is a few KiB, speed is irrelevant. */
static uint32_t crc32_ieee(const unsigned char *data, size_t len)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static char *dup_value(const unsigned char *value, uint32_t len)
{
    char *s = malloc((size_t)len + 1);
    if (!s)
        return NULL;
    memcpy(s, value, len);
    s[len] = '\0';
    return s;
}

static int list_append(struct hm_strlist *list, char *item)
{
    char **grown = realloc(list->items, (list->count + 2) * sizeof(char *));
    if (!grown)
        return -1;
    list->items = grown;
    list->items[list->count++] = item;
    list->items[list->count] = NULL;
    return 0;
}

static int set_once(char **slot, char *value)
{
    free(*slot);
    *slot = value;
    return 0;
}

static void init_list(struct hm_strlist *list)
{
    list->items = calloc(1, sizeof(char *));
    list->count = 0;
}

/* "<mode>:<serial>:<upper serial>:<path>"; takes ownership of s. Returns 0, or -1 with err set. */
static int parse_volume(char *s, struct hm_config *out, char *err, size_t errlen)
{
    if (out->volume_count >= HM_MAX_VOLUMES) {
        snprintf(err, errlen, "more than %d volumes", HM_MAX_VOLUMES);
        free(s);
        return -1;
    }
    char *fields[3];
    char *rest = s;
    for (int i = 0; i < 3; i++) {
        char *colon = strchr(rest, ':');
        if (!colon) {
            snprintf(err, errlen, "volume record without 4 fields: %.60s", s);
            free(s);
            return -1;
        }
        *colon = '\0';
        fields[i] = rest;
        rest = colon + 1;
    }
    struct hm_volume volume;
    memset(&volume, 0, sizeof(volume));
    if (strcmp(fields[0], "ro") == 0)
        volume.mode = HM_VOLUME_RO;
    else if (strcmp(fields[0], "rw") == 0)
        volume.mode = HM_VOLUME_RW;
    else if (strcmp(fields[0], "overlay") == 0)
        volume.mode = HM_VOLUME_OVERLAY;
    else {
        snprintf(err, errlen, "volume mode %.20s is not ro, rw or overlay", fields[0]);
        free(s);
        return -1;
    }
    if (!fields[1][0] || rest[0] != '/' || (volume.mode == HM_VOLUME_OVERLAY) != (fields[2][0] != '\0')) {
        snprintf(err, errlen, "bad volume record for %.60s", rest);
        free(s);
        return -1;
    }
    volume.serial = strdup(fields[1]);
    volume.upper_serial = fields[2][0] ? strdup(fields[2]) : NULL;
    volume.path = strdup(rest);
    free(s);
    if (!volume.serial || !volume.path || (fields[2][0] && !volume.upper_serial)) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    out->volumes[out->volume_count++] = volume;
    return 0;
}

int hm_config_parse(const unsigned char *image, size_t len, struct hm_config *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->net_prefix = -1;
    init_list(&out->entrypoint);
    init_list(&out->cmd);
    init_list(&out->env);
    init_list(&out->dns);
    if (!out->entrypoint.items || !out->cmd.items || !out->env.items || !out->dns.items) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (len < HM_CONFIG_HEADER_SIZE || memcmp(image, HM_CONFIG_MAGIC, 8) != 0) {
        snprintf(err, errlen, "config disk has no " HM_CONFIG_MAGIC " header");
        return -1;
    }
    uint32_t version = get_u32(image + 8);
    uint32_t payload_len = get_u32(image + 12);
    uint32_t crc = get_u32(image + 16);
    if (version != HM_CONFIG_VERSION) {
        snprintf(err, errlen, "config disk format version %u, this init reads %u", version, HM_CONFIG_VERSION);
        return -1;
    }
    if (payload_len > HM_CONFIG_MAX_PAYLOAD || payload_len > len - HM_CONFIG_HEADER_SIZE) {
        snprintf(err, errlen, "config payload length %u exceeds the disk", payload_len);
        return -1;
    }
    const unsigned char *payload = image + HM_CONFIG_HEADER_SIZE;
    if (crc32_ieee(payload, payload_len) != crc) {
        snprintf(err, errlen, "config payload checksum mismatch");
        return -1;
    }
    size_t pos = 0;
    while (pos < payload_len) {
        if (payload_len - pos < 8) {
            snprintf(err, errlen, "truncated record header at offset %zu", pos);
            return -1;
        }
        uint16_t type = get_u16(payload + pos);
        uint32_t vlen = get_u32(payload + pos + 4);
        pos += 8;
        if (vlen > payload_len - pos) {
            snprintf(err, errlen, "record type %u at offset %zu overruns the payload", type, pos - 8);
            return -1;
        }
        const unsigned char *value = payload + pos;
        pos += vlen;
        if (memchr(value, '\0', vlen)) {
            snprintf(err, errlen, "record type %u contains a NUL byte", type);
            return -1;
        }
        char *s = dup_value(value, vlen);
        if (!s) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        int rc = 0;
        switch (type) {
        case HM_REC_ENTRYPOINT_ARG: rc = list_append(&out->entrypoint, s); break;
        case HM_REC_CMD_ARG: rc = list_append(&out->cmd, s); break;
        case HM_REC_ENV:
            if (!strchr(s, '=') || s[0] == '=') {
                snprintf(err, errlen, "env record without KEY=: %.60s", s);
                free(s);
                return -1;
            }
            rc = list_append(&out->env, s);
            break;
        case HM_REC_WORKDIR: rc = set_once(&out->workdir, s); break;
        case HM_REC_HOSTNAME: rc = set_once(&out->hostname, s); break;
        case HM_REC_NET_IP: rc = set_once(&out->net_ip, s); break;
        case HM_REC_NET_GATEWAY: rc = set_once(&out->net_gateway, s); break;
        case HM_REC_NET_DNS: rc = list_append(&out->dns, s); break;
        case HM_REC_VOLUME:
            if (parse_volume(s, out, err, errlen) != 0)
                return -1;
            break;
        case HM_REC_NET_PREFIX: {
            char *end = NULL;
            long prefix = strtol(s, &end, 10);
            if (vlen == 0 || *end != '\0' || prefix < 0 || prefix > 32) {
                snprintf(err, errlen, "bad network prefix %.20s", s);
                free(s);
                return -1;
            }
            out->net_prefix = (int)prefix;
            free(s);
            break;
        }
        default:
            /* Unknown records come from a newer host: skip them so old guests still boot. */
            free(s);
            break;
        }
        if (rc != 0) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    return 0;
}

int hm_config_read(const char *path, struct hm_config *out, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "open %s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char header[HM_CONFIG_HEADER_SIZE];
    ssize_t got = pread(fd, header, sizeof(header), 0);
    if (got != (ssize_t)sizeof(header)) {
        snprintf(err, errlen, "read config header from %s: %s", path, got < 0 ? strerror(errno) : "short read");
        close(fd);
        return -1;
    }
    uint32_t payload_len = get_u32(header + 12);
    if (memcmp(header, HM_CONFIG_MAGIC, 8) != 0 || payload_len > HM_CONFIG_MAX_PAYLOAD) {
        close(fd);
        return hm_config_parse(header, sizeof(header), out, err, errlen);
    }
    size_t total = HM_CONFIG_HEADER_SIZE + (size_t)payload_len;
    unsigned char *image = malloc(total);
    if (!image) {
        snprintf(err, errlen, "out of memory");
        close(fd);
        return -1;
    }
    size_t have = 0;
    while (have < total) {
        ssize_t n = pread(fd, image + have, total - have, (off_t)have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
    }
    close(fd);
    int rc = hm_config_parse(image, have, out, err, errlen);
    free(image);
    return rc;
}
