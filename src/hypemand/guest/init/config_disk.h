/* The config disk: what PID 1 needs to know about the program it runs.
 * Format: see src/hypemand/guest/README.md ("Boot path and config disk") and config_disk.py. */
#ifndef HYPEMAN_CONFIG_DISK_H
#define HYPEMAN_CONFIG_DISK_H

#include <stddef.h>

#define HM_CONFIG_MAGIC "HYPEMANC"
#define HM_CONFIG_VERSION 1
#define HM_CONFIG_HEADER_SIZE 32
#define HM_CONFIG_MAX_PAYLOAD (8u << 20)

enum hm_config_record {
    HM_REC_ENTRYPOINT_ARG = 1,
    HM_REC_CMD_ARG = 2,
    HM_REC_ENV = 3, /* "KEY=VALUE" */
    HM_REC_WORKDIR = 4,
    HM_REC_HOSTNAME = 5,
    HM_REC_NET_IP = 16,     /* dotted IPv4 */
    HM_REC_NET_PREFIX = 17, /* decimal, 0..32 */
    HM_REC_NET_GATEWAY = 18,
    HM_REC_NET_DNS = 19, /* repeatable */
    HM_REC_VOLUME = 32,  /* repeatable: "<ro|rw|overlay>:<serial>:<upper serial or empty>:<mount path>" */
};

enum hm_volume_mode { HM_VOLUME_RO, HM_VOLUME_RW, HM_VOLUME_OVERLAY };

/* A volume to mount before the program starts; its disks are found by virtio serial. */
struct hm_volume {
    enum hm_volume_mode mode;
    char *serial;
    char *upper_serial; /* NULL unless mode is HM_VOLUME_OVERLAY */
    char *path;         /* absolute, in the guest's root */
};

#define HM_MAX_VOLUMES 32

/* String lists are NULL-terminated (ready for execve) and count excludes the NULL. */
struct hm_strlist {
    char **items;
    size_t count;
};

struct hm_config {
    struct hm_strlist entrypoint;
    struct hm_strlist cmd;
    struct hm_strlist env;
    char *workdir;
    char *hostname;
    char *net_ip;
    int net_prefix; /* -1 when absent */
    char *net_gateway;
    struct hm_strlist dns;
    struct hm_volume volumes[HM_MAX_VOLUMES];
    size_t volume_count;
};

/* Parse a whole config image held in memory. Returns 0, or -1 with a reason in err. */
int hm_config_parse(const unsigned char *image, size_t len, struct hm_config *out, char *err, size_t errlen);

/* Read and parse the config from a block device or file. Returns 0, or -1 with a reason in err. */
int hm_config_read(const char *path, struct hm_config *out, char *err, size_t errlen);

#endif
