#include "power_button.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <unistd.h>

/* From <linux/input.h> and <linux/input-event-codes.h>, which musl does not ship. */
#define HM_EV_KEY 0x01
#define HM_KEY_POWER 116
#define HM_KEY_MAX 0x2ff
#define HM_EVIOCGBIT(ev, len) _IOC(_IOC_READ, 'E', 0x20 + (ev), (len))

struct hm_input_event {
    struct timeval time;
    uint16_t type;
    uint16_t code;
    int32_t value;
};

static int can_report_power_key(int fd)
{
    unsigned char keys[HM_KEY_MAX / 8 + 1];
    memset(keys, 0, sizeof(keys));
    if (ioctl(fd, HM_EVIOCGBIT(HM_EV_KEY, sizeof(keys)), keys) < 0)
        return 0;
    return (keys[HM_KEY_POWER / 8] >> (HM_KEY_POWER % 8)) & 1;
}

int power_button_open(int *fds, int max)
{
    DIR *dir = opendir("/dev/input");
    if (!dir)
        return 0;
    int count = 0;
    struct dirent *entry;
    while (count < max && (entry = readdir(dir)) != NULL) {
        if (strncmp(entry->d_name, "event", 5) != 0)
            continue;
        char path[300];
        snprintf(path, sizeof(path), "/dev/input/%.200s", entry->d_name);
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (can_report_power_key(fd))
            fds[count++] = fd;
        else
            close(fd);
    }
    closedir(dir);
    return count;
}

int power_button_pressed(int fd)
{
    struct hm_input_event events[16];
    int pressed = 0;
    for (;;) {
        ssize_t n = read(fd, events, sizeof(events));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        for (size_t i = 0; i < (size_t)n / sizeof(events[0]); i++)
            if (events[i].type == HM_EV_KEY && events[i].code == HM_KEY_POWER && events[i].value == 1)
                pressed = 1;
    }
    return pressed;
}
