/* Test harness: parse a config image with the guest's own C parser and print what it read.
 * Built on the host by tests/boot/test_config_disk.py together with init/config_disk.c. */
#include <stdio.h>
#include <stdlib.h>

#include "config_disk.h"

static void print_list(const char *name, const struct hm_strlist *list)
{
    for (size_t i = 0; i < list->count; i++)
        printf("%s\t%s\n", name, list->items[i]);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    struct hm_config config;
    char err[256];
    if (hm_config_read(argv[1], &config, err, sizeof(err)) != 0) {
        printf("error\t%s\n", err);
        return 1;
    }
    print_list("entrypoint", &config.entrypoint);
    print_list("cmd", &config.cmd);
    print_list("env", &config.env);
    printf("workdir\t%s\n", config.workdir ? config.workdir : "");
    printf("hostname\t%s\n", config.hostname ? config.hostname : "");
    if (config.net_ip)
        printf("net\t%s/%d via %s\n", config.net_ip, config.net_prefix, config.net_gateway ? config.net_gateway : "-");
    print_list("dns", &config.dns);
    return 0;
}
