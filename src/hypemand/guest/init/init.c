/* hypeman guest PID 1: boots the VM from the initrd into the image and runs its program.
 *
 * Sequence (see src/hypemand/guest/README.md, "Boot path and config disk"):
 *   mount /proc /sys /dev /dev/pts /dev/shm /run -> load modules (finit_module, order from the initrd)
 *   -> find disks by virtio serial (hm-root, hm-overlay, hm-config) -> read the config disk
 *   -> overlayfs(lower=image ro, upper=overlay disk) -> move /proc /sys /dev /run into it
 *   -> hostname, network -> open the agent port -> switch root -> fork agent -> run program
 *   -> reap zombies until the program exits -> HYPEMAN-EXIT -> sync -> power off.
 * The ACPI power button (QEMU system_powerdown) stops the program: SIGTERM, a grace period,
 * SIGKILL; then the same exit path.
 *
 * Every failure ends in a HYPEMAN-EXIT marker and a power-off: the guest never hangs waiting
 * for someone to look at it.
 *
 * Not PID 1 and argv[1] == "agent": serve the agent protocol on argv[2] (host-side testing). */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "config_disk.h"
#include "netconf.h"
#include "power_button.h"

#define MODULE_LIST "etc/hypeman/modules" /* in the initrd */
#define DISK_ROOT_SERIAL "hm-root"
#define DISK_OVERLAY_SERIAL "hm-overlay"
#define DISK_CONFIG_SERIAL "hm-config"
#define DEVICE_WAIT_MS 30000
#define AGENT_PORT_WAIT_MS 5000
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
/* Power button: how long the program may take to stop after SIGTERM before it gets SIGKILL. */
#define STOP_GRACE_MS 5000

/* Used when agent.c is not linked in: keeps the port open and idle so the boot path works. */
__attribute__((weak)) int agent_serve(int fd)
{
    (void)fd;
    for (;;)
        pause();
    return 0;
}

static int console_fd = 2;
static volatile pid_t program_pid = 0;
/* SIGCHLD wakes the main loop's poll() through this pipe (the self-pipe trick). */
static int sigchld_pipe[2] = {-1, -1};

static double monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One write per line, so markers never interleave with the program's output mid-line. */
static void console_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void console_line(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(console_fd, line + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += w;
    }
}

#define LOG(...) console_line("hypeman-init: " __VA_ARGS__)

/* hypeman.debug on the kernel command line: log each boot step with its guest timestamp. */
static int debug_enabled = 0;
#define DEBUG_STEP(...)                                                                            \
    do {                                                                                           \
        if (debug_enabled) {                                                                       \
            char step_[200];                                                                       \
            snprintf(step_, sizeof(step_), __VA_ARGS__);                                           \
            console_line("hypeman-init: [%.3f] %s", monotonic_seconds(), step_);                   \
        }                                                                                          \
    } while (0)

/* Quote a message for HYPEMAN-EXIT message="...": backslash-escape quotes and backslashes,
 * replace control characters so the marker stays on one line. */
static void quote_message(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    for (const char *p = in; *p && o + 3 < outlen; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            out[o++] = ' ';
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
}

/* Mounts of volumes, in the order made: unmounted in reverse before power-off, so a read-write
 * volume's ext4 is left clean (no journal to replay) for the read-only VMs that attach it next. */
#define MAX_VOLUME_MOUNTS (3 * HM_MAX_VOLUMES)
static char *volume_mounts[MAX_VOLUME_MOUNTS];
static size_t volume_mount_count = 0;

static void unmount_volumes(void)
{
    while (volume_mount_count > 0) {
        char *target = volume_mounts[--volume_mount_count];
        if (umount2(target, 0) != 0 && mount(NULL, target, NULL, MS_REMOUNT | MS_RDONLY, NULL) != 0)
            umount2(target, MNT_DETACH);
        free(target);
    }
}

static void power_off(void) __attribute__((noreturn));
static void power_off(void)
{
    sync();
    unmount_volumes();
    sync();
    reboot(RB_POWER_OFF);
    /* Only reached when power-off is unsupported: a reboot ends QEMU started with -no-reboot. */
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
}

static void exit_marker_and_power_off(int code, const char *message) __attribute__((noreturn));
static void exit_marker_and_power_off(int code, const char *message)
{
    char quoted[512];
    quote_message(message, quoted, sizeof(quoted));
    console_line("HYPEMAN-EXIT code=%d message=\"%s\"", code, quoted);
    power_off();
}

static void boot_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void boot_fail(const char *fmt, ...)
{
    char reason[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    console_line("HYPEMAN-BOOT-ERROR %s", reason);
    char message[450];
    snprintf(message, sizeof(message), "boot failed: %s", reason);
    exit_marker_and_power_off(127, message);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void ensure_dir(const char *path, mode_t mode)
{
    if (mkdir(path, mode) != 0 && errno != EEXIST)
        LOG("mkdir %s: %s", path, strerror(errno));
}

/* mkdir -p, for mount points inside the new root. */
static void ensure_dirs(const char *path, mode_t mode)
{
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(buf, mode);
            *p = '/';
        }
    }
    ensure_dir(buf, mode);
}

static void must_mount(const char *src, const char *target, const char *type, unsigned long flags,
                       const char *data)
{
    ensure_dir(target, 0755);
    if (mount(src, target, type, flags, data) != 0)
        boot_fail("mount %s on %s (%s): %s", src, target, type, strerror(errno));
}

static void mount_essentials(void)
{
    must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    must_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5");
    must_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    must_mount("run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    /* Links that programs expect and devtmpfs does not make. */
    symlink("/proc/self/fd", "/dev/fd");
    symlink("/proc/self/fd/0", "/dev/stdin");
    symlink("/proc/self/fd/1", "/dev/stdout");
    symlink("/proc/self/fd/2", "/dev/stderr");
}

static void attach_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return; /* keep whatever the kernel gave us */
    console_fd = fd;
    dup2(fd, 1);
    dup2(fd, 2);
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0 && null_fd != 0) {
        dup2(null_fd, 0);
        close(null_fd);
    }
}

static int read_small_file(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    /* Trim trailing whitespace and NULs (virtio-blk pads serials). */
    while (n > 0 && (isspace((unsigned char)buf[n - 1]) || buf[n - 1] == '\0'))
        buf[--n] = '\0';
    return 0;
}

/* Modules are loaded by group, when needed: MODULE_LIST holds "<group> <path>" lines, the
 * files of a group in dependency order. Files shared by groups are loaded once (a repeated
 * finit_module would still pay for the signature check before failing with EEXIST).
 * A module that fails is logged, not fatal: the device it drives may simply be absent. */
#define MAX_LOADED_MODULES 64
static char *loaded_modules[MAX_LOADED_MODULES];
static size_t loaded_module_count = 0;
/* The initrd's root. Kept open across the switch to the image's root, so module groups can
 * still be loaded later (the initramfs stays in memory under the new root anyway). */
static int initrd_root_fd = AT_FDCWD;

static int open_in_initrd(const char *path)
{
    while (*path == '/')
        path++;
    return openat(initrd_root_fd, path, O_RDONLY | O_CLOEXEC);
}

static int module_already_loaded(const char *path)
{
    for (size_t i = 0; i < loaded_module_count; i++)
        if (strcmp(loaded_modules[i], path) == 0)
            return 1;
    return 0;
}

/* Returns the number of files of the group that are now loaded, or -1 if the group is unknown. */
static int load_module_group(const char *group)
{
    int list_fd = open_in_initrd(MODULE_LIST);
    FILE *list = list_fd >= 0 ? fdopen(list_fd, "r") : NULL;
    if (!list) {
        if (list_fd >= 0)
            close(list_fd);
        LOG("no module list %s: %s", MODULE_LIST, strerror(errno));
        return -1;
    }
    int found = -1;
    size_t glen = strlen(group);
    char line[512];
    while (fgets(line, sizeof(line), list)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strncmp(line, group, glen) != 0 || line[glen] != ' ')
            continue;
        const char *path = line + glen + 1;
        if (found < 0)
            found = 0;
        if (module_already_loaded(path)) {
            found++;
            continue;
        }
        int fd = open_in_initrd(path);
        if (fd < 0) {
            LOG("module %s: %s", path, strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) {
            LOG("module %s: %s", path, strerror(errno));
        } else {
            found++;
            if (loaded_module_count < MAX_LOADED_MODULES)
                loaded_modules[loaded_module_count++] = strdup(path);
        }
        close(fd);
        DEBUG_STEP("loaded %.150s", path);
    }
    fclose(list);
    if (found < 0)
        LOG("module group %s is not in the initrd", group);
    return found;
}

static int path_has_entries(const char *dir_path, const char *prefix)
{
    DIR *dir = opendir(dir_path);
    if (!dir)
        return 0;
    struct dirent *entry;
    int found = 0;
    while (!found && (entry = readdir(dir)) != NULL)
        found = entry->d_name[0] != '.' && strncmp(entry->d_name, prefix, strlen(prefix)) == 0;
    closedir(dir);
    return found;
}

/* The virtio transport: virtio-mmio devices are announced by ACPI (microvm, id LNRO0005), virtio-pci
 * by the PCI bus (q35/pc). Unknown machine: load both. */
static void load_virtio_transport(void)
{
    int mmio = path_has_entries("/sys/bus/acpi/devices", "LNRO0005");
    int pci = path_has_entries("/sys/bus/pci/devices", "0");
    if (mmio || !pci)
        load_module_group("virtio_mmio");
    if (pci || !mmio)
        load_module_group("virtio_pci");
}

/* Whether a virtio device of this type (virtio spec device id) is present. */
static int virtio_device_present(int device_id)
{
    DIR *dir = opendir("/sys/bus/virtio/devices");
    if (!dir)
        return 0;
    struct dirent *entry;
    int found = 0;
    while (!found && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        char path[300], id[32];
        snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/device", entry->d_name);
        if (read_small_file(path, id, sizeof(id)) == 0 && strtol(id, NULL, 16) == device_id)
            found = 1;
    }
    closedir(dir);
    return found;
}

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5

struct disks {
    char root[64];
    char overlay[64];
    char config[64];
};

static void scan_disks(struct disks *found)
{
    DIR *dir = opendir("/sys/block");
    if (!dir)
        return;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strncmp(entry->d_name, "vd", 2) != 0)
            continue;
        char path[300], serial[64];
        snprintf(path, sizeof(path), "/sys/block/%s/serial", entry->d_name);
        if (read_small_file(path, serial, sizeof(serial)) != 0)
            continue;
        char *slot = NULL;
        if (strcmp(serial, DISK_ROOT_SERIAL) == 0)
            slot = found->root;
        else if (strcmp(serial, DISK_OVERLAY_SERIAL) == 0)
            slot = found->overlay;
        else if (strcmp(serial, DISK_CONFIG_SERIAL) == 0)
            slot = found->config;
        if (slot)
            snprintf(slot, sizeof(found->root), "/dev/%.50s", entry->d_name);
    }
    closedir(dir);
}

/* Disks appear while virtio_blk probes; poll rather than guess a delay. The /dev node is
 * created by devtmpfs shortly after the sysfs entry, so wait for both. */
static void wait_for_disks(struct disks *found)
{
    double deadline = monotonic_seconds() + DEVICE_WAIT_MS / 1000.0;
    for (;;) {
        memset(found, 0, sizeof(*found));
        scan_disks(found);
        if (found->root[0] && found->overlay[0] && found->config[0] && access(found->root, F_OK) == 0 &&
            access(found->overlay, F_OK) == 0 && access(found->config, F_OK) == 0)
            return;
        if (monotonic_seconds() > deadline)
            break;
        sleep_ms(2);
    }
    boot_fail("disks missing after %d s:%s%s%s", DEVICE_WAIT_MS / 1000, found->root[0] ? "" : " " DISK_ROOT_SERIAL,
              found->overlay[0] ? "" : " " DISK_OVERLAY_SERIAL, found->config[0] ? "" : " " DISK_CONFIG_SERIAL);
}

/* The device of the disk with this virtio serial, polled for (disks appear while virtio_blk
 * probes); fails the boot when it does not appear. */
static void wait_for_serial(const char *serial, char *device, size_t len)
{
    double deadline = monotonic_seconds() + DEVICE_WAIT_MS / 1000.0;
    for (;;) {
        DIR *dir = opendir("/sys/block");
        struct dirent *entry;
        device[0] = '\0';
        while (dir && (entry = readdir(dir)) != NULL) {
            if (strncmp(entry->d_name, "vd", 2) != 0)
                continue;
            char path[300], found[64];
            snprintf(path, sizeof(path), "/sys/block/%s/serial", entry->d_name);
            if (read_small_file(path, found, sizeof(found)) == 0 && strcmp(found, serial) == 0) {
                snprintf(device, len, "/dev/%.50s", entry->d_name);
                break;
            }
        }
        if (dir)
            closedir(dir);
        if (device[0] && access(device, F_OK) == 0)
            return;
        if (monotonic_seconds() > deadline)
            boot_fail("volume disk %s missing after %d s", serial, DEVICE_WAIT_MS / 1000);
        sleep_ms(2);
    }
}

struct volume_devices {
    char base[64];
    char upper[64];
};

static void record_volume_mount(const char *target)
{
    if (volume_mount_count < MAX_VOLUME_MOUNTS)
        volume_mounts[volume_mount_count++] = strdup(target);
}

static void mount_volume_fs(const struct hm_volume *volume, const char *device, const char *target,
                            unsigned long flags)
{
    ensure_dirs(target, 0755);
    if (mount(device, target, "ext4", flags | MS_NOATIME, NULL) != 0)
        boot_fail("volume %s: mount %s on %s (ext4%s): %s", volume->serial, device, target,
                  flags & MS_RDONLY ? ", read-only" : "", strerror(errno));
    record_volume_mount(target);
}

/* Every volume at its mount path in the (new) root, before the program starts: ext4 read-only
 * or read-write, or an overlayfs of the read-only base and the instance's upper disk (base and
 * upper mounted under /run/hypeman/volumes/<n>). A volume that cannot be mounted fails the
 * boot with a console line saying which. */
static void mount_volumes(const struct hm_config *config, const struct volume_devices *devices)
{
    for (size_t i = 0; i < config->volume_count; i++) {
        const struct hm_volume *volume = &config->volumes[i];
        if (volume->mode != HM_VOLUME_OVERLAY) {
            mount_volume_fs(volume, devices[i].base, volume->path, volume->mode == HM_VOLUME_RO ? MS_RDONLY : 0);
            DEBUG_STEP("volume %s mounted at %.100s", volume->serial, volume->path);
            continue;
        }
        char base[96], upper[96], dir[128], data[512];
        snprintf(base, sizeof(base), "/run/hypeman/volumes/%zu/base", i);
        snprintf(upper, sizeof(upper), "/run/hypeman/volumes/%zu/upper", i);
        mount_volume_fs(volume, devices[i].base, base, MS_RDONLY);
        mount_volume_fs(volume, devices[i].upper, upper, 0);
        snprintf(dir, sizeof(dir), "%s/upper", upper);
        ensure_dir(dir, 0755);
        snprintf(dir, sizeof(dir), "%s/work", upper);
        ensure_dir(dir, 0755);
        snprintf(data, sizeof(data), "lowerdir=%s,upperdir=%s/upper,workdir=%s/work", base, upper, upper);
        ensure_dirs(volume->path, 0755);
        if (mount("overlay", volume->path, "overlay", 0, data) != 0)
            boot_fail("volume %s: overlay mount on %s: %s", volume->serial, volume->path, strerror(errno));
        record_volume_mount(volume->path);
        DEBUG_STEP("volume %s mounted at %.100s (overlay)", volume->serial, volume->path);
    }
}

/* Both file systems keep their superblock at byte 1024: erofs starts it with a 32-bit magic,
 * ext2/3/4 has a 16-bit magic 56 bytes in. Looking first keeps a failed ext4 probe's kernel
 * error out of the console (which is the app log). */
static const char *detect_image_fs(const char *device)
{
    unsigned char sb[1024];
    int fd = open(device, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    ssize_t n = pread(fd, sb, sizeof(sb), 1024);
    close(fd);
    if (n != (ssize_t)sizeof(sb))
        return NULL;
    if (sb[0] == 0xE2 && sb[1] == 0xE1 && sb[2] == 0xF5 && sb[3] == 0xE0)
        return "erofs";
    if (sb[56] == 0x53 && sb[57] == 0xEF)
        return "ext4";
    return NULL;
}

static void mount_image(const char *device, const char *target)
{
    ensure_dir(target, 0755);
    const char *fs = detect_image_fs(device);
    if (!fs)
        boot_fail("image disk %s is neither ext4 nor erofs (no superblock found)", device);
    if (strcmp(fs, "erofs") == 0)
        load_module_group("erofs"); /* only images that are not ext4 pay for it */
    if (mount(device, target, fs, MS_RDONLY, NULL) != 0)
        boot_fail("mount image disk %s (%s): %s", device, fs, strerror(errno));
}

static void move_mount(const char *from, const char *to)
{
    ensure_dirs(to, 0755);
    if (mount(from, to, NULL, MS_MOVE, NULL) != 0)
        boot_fail("move %s to %s: %s", from, to, strerror(errno));
}

/* The agent's virtio-serial port: /sys/class/virtio-ports/vportNpM/name == AGENT_PORT_NAME.
 * Ports are announced by the device after the driver loads, so poll for a while. */
static int open_agent_port(void)
{
    double deadline = monotonic_seconds() + AGENT_PORT_WAIT_MS / 1000.0;
    for (;;) {
        DIR *dir = opendir("/sys/class/virtio-ports");
        if (dir) {
            struct dirent *entry;
            while ((entry = readdir(dir)) != NULL) {
                if (entry->d_name[0] == '.')
                    continue;
                char path[300], name[128];
                snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", entry->d_name);
                if (read_small_file(path, name, sizeof(name)) != 0 || strcmp(name, AGENT_PORT_NAME) != 0)
                    continue;
                snprintf(path, sizeof(path), "/dev/%.100s", entry->d_name);
                int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
                if (fd >= 0) {
                    closedir(dir);
                    return fd;
                }
            }
            closedir(dir);
        }
        if (monotonic_seconds() > deadline)
            return -1;
        sleep_ms(2);
    }
}

/* The agent runs with the program's environment, so exec sessions see what the program sees
 * (as `docker exec` does); a request's own variables are applied on top by the agent. */
static pid_t start_agent(int port_fd, char **program_env)
{
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        /* PID 1's signal forwarding stays installed but forwards nothing here: a restarted agent
         * must not pass a SIGTERM meant for it on to the program. */
        program_pid = 0;
        signal(SIGCHLD, SIG_DFL); /* PID 1's handler and pipe are not the agent's */
        close(sigchld_pipe[0]);
        close(sigchld_pipe[1]);
        if (initrd_root_fd >= 0)
            close(initrd_root_fd);
        clearenv();
        for (char **e = program_env; e && *e; e++)
            putenv(*e);
        /* The forked child keeps the port fd; clear CLOEXEC in case the agent execs helpers. */
        int flags = fcntl(port_fd, F_GETFD);
        if (flags >= 0)
            fcntl(port_fd, F_SETFD, flags & ~FD_CLOEXEC);
        int rc = agent_serve(port_fd);
        _exit(rc == 0 ? 0 : 1);
    }
    if (pid < 0)
        LOG("fork agent: %s", strerror(errno));
    return pid;
}

static void write_text_file(const char *path, const char *text)
{
    unlink(path); /* images often ship /etc/resolv.conf as a symlink into /run */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        LOG("write %s: %s", path, strerror(errno));
        return;
    }
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len)
        LOG("write %s: %s", path, strerror(errno));
    close(fd);
}

static void configure_network(const struct hm_config *config, const char *new_root)
{
    char err[256];
    if (netconf_link_up("lo", err, sizeof(err)) != 0)
        LOG("network: %s", err);
    if (!config->net_ip)
        return;
    if (!virtio_device_present(VIRTIO_ID_NET)) {
        LOG("network: configured but the VM has no virtio-net device");
        return;
    }
    load_module_group("virtio_net");
    if (netconf_wait_for_link("eth0", DEVICE_WAIT_MS) != 0) {
        LOG("network: no eth0 appeared");
        return;
    }
    int prefix = config->net_prefix >= 0 ? config->net_prefix : 24;
    if (netconf_ipv4("eth0", config->net_ip, prefix, config->net_gateway, err, sizeof(err)) != 0)
        LOG("network: %s", err);
    if (config->dns.count > 0) {
        char resolv[1024] = "";
        size_t used = 0;
        for (size_t i = 0; i < config->dns.count && used < sizeof(resolv); i++)
            used += (size_t)snprintf(resolv + used, sizeof(resolv) - used, "nameserver %s\n", config->dns.items[i]);
        char path[256];
        snprintf(path, sizeof(path), "%s/etc", new_root);
        ensure_dir(path, 0755);
        snprintf(path, sizeof(path), "%s/etc/resolv.conf", new_root);
        write_text_file(path, resolv);
    }
}

static void set_hostname(const struct hm_config *config, const char *new_root)
{
    const char *name = config->hostname && config->hostname[0] ? config->hostname : "hypeman";
    if (sethostname(name, strlen(name)) != 0)
        LOG("sethostname: %s", strerror(errno));
    char path[256];
    snprintf(path, sizeof(path), "%s/etc/hosts", new_root);
    if (access(path, F_OK) != 0) {
        char hosts[512];
        snprintf(hosts, sizeof(hosts), "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t%s\n", name);
        write_text_file(path, hosts);
    }
}

static const char *env_lookup(char **env, const char *key)
{
    size_t klen = strlen(key);
    for (char **e = env; e && *e; e++)
        if (strncmp(*e, key, klen) == 0 && (*e)[klen] == '=')
            return *e + klen + 1;
    return NULL;
}

/* The program's environment: the config's, plus PATH and HOME when it has none. */
static char **program_environment(const struct hm_config *config)
{
    size_t n = config->env.count;
    char **env = calloc(n + 3, sizeof(char *));
    if (!env)
        boot_fail("out of memory");
    size_t i = 0;
    for (; i < n; i++)
        env[i] = config->env.items[i];
    if (!env_lookup(env, "PATH"))
        env[i++] = "PATH=" DEFAULT_PATH;
    if (!env_lookup(env, "HOME"))
        env[i++] = "HOME=/root";
    env[i] = NULL;
    return env;
}

/* execvp semantics, but with the PATH of the program's environment, not ours. */
static int resolve_executable(const char *name, const char *path_var, char *out, size_t outlen)
{
    if (strchr(name, '/')) {
        snprintf(out, outlen, "%s", name);
        /* A relative path is relative to the working dir: only execve, after chdir, can tell. */
        return name[0] != '/' || access(out, X_OK) == 0 ? 0 : -1;
    }
    const char *p = path_var;
    int saw_eacces = 0;
    while (p) {
        const char *colon = strchr(p, ':');
        size_t dlen = colon ? (size_t)(colon - p) : strlen(p);
        snprintf(out, outlen, "%.*s/%s", (int)dlen, dlen ? p : ".", name);
        struct stat st;
        if (stat(out, &st) == 0 && S_ISREG(st.st_mode)) {
            if (access(out, X_OK) == 0)
                return 0;
            saw_eacces = 1;
        }
        p = colon ? colon + 1 : NULL;
    }
    errno = saw_eacces ? EACCES : ENOENT;
    return -1;
}

static void forward_signal(int sig)
{
    if (program_pid > 0)
        kill(program_pid, sig);
}

static void install_signal_forwarding(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = forward_signal;
    sa.sa_flags = SA_RESTART;
    int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
        sigaction(forwarded[i], &sa, NULL);
    /* Ctrl-Alt-Del (and a host "system_reset"-style request) arrives as SIGINT for PID 1. */
    reboot(RB_DISABLE_CAD);
}

static void on_sigchld(int sig)
{
    (void)sig;
    int saved = errno;
    if (write(sigchld_pipe[1], "c", 1) < 0) {
    } /* full pipe: a wake-up is already pending */
    errno = saved;
}

static void install_sigchld_wakeup(void)
{
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        boot_fail("pipe: %s", strerror(errno));
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
}

/* Start the program; returns its pid. An exec failure in the child is reported back through a
 * close-on-exec pipe (EOF = exec succeeded) and ends the boot with a clear message. */
static pid_t start_program(const struct hm_config *config, char **env)
{
    size_t argc = config->entrypoint.count + config->cmd.count;
    if (argc == 0)
        exit_marker_and_power_off(127, "no entrypoint or cmd configured");
    char **argv = calloc(argc + 1, sizeof(char *));
    if (!argv)
        boot_fail("out of memory");
    size_t a = 0;
    for (size_t i = 0; i < config->entrypoint.count; i++)
        argv[a++] = config->entrypoint.items[i];
    for (size_t i = 0; i < config->cmd.count; i++)
        argv[a++] = config->cmd.items[i];
    char executable[1024];
    if (resolve_executable(argv[0], env_lookup(env, "PATH"), executable, sizeof(executable)) != 0) {
        char message[1200];
        snprintf(message, sizeof(message), "exec %s: %s", argv[0], strerror(errno));
        exit_marker_and_power_off(127, message);
    }
    const char *workdir = config->workdir && config->workdir[0] ? config->workdir : "/";

    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0)
        boot_fail("pipe: %s", strerror(errno));
    console_line("HYPEMAN-PROGRAM-START ts=%.3f", monotonic_seconds());
    pid_t pid = fork();
    if (pid < 0)
        boot_fail("fork program: %s", strerror(errno));
    if (pid == 0) {
        close(report[0]);
        setsid();
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        int stage = 0; /* 0: chdir, 1: exec */
        if (chdir(workdir) == 0) {
            stage = 1;
            execve(executable, argv, env);
        }
        int failure[2] = {stage, errno};
        if (write(report[1], failure, sizeof(failure)) < 0) {
        }
        _exit(127);
    }
    program_pid = pid;
    close(report[1]);
    int failure[2];
    ssize_t n;
    do {
        n = read(report[0], failure, sizeof(failure));
    } while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n == (ssize_t)sizeof(failure)) {
        waitpid(pid, NULL, 0);
        char message[1200];
        if (failure[0] == 0)
            snprintf(message, sizeof(message), "chdir %s: %s", workdir, strerror(failure[1]));
        else
            snprintf(message, sizeof(message), "exec %s: %s", executable, strerror(failure[1]));
        exit_marker_and_power_off(127, message);
    }
    free(argv);
    return pid;
}

/* Ask everything still running to stop, then insist, so file systems are quiet before sync. */
static void stop_remaining_processes(pid_t agent_pid)
{
    if (agent_pid > 0)
        kill(agent_pid, SIGKILL); /* ours: nothing to save */
    kill(-1, SIGTERM);
    double deadline = monotonic_seconds() + 2.0;
    while (monotonic_seconds() < deadline) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid < 0 && errno == ECHILD)
            return;
        if (pid <= 0)
            sleep_ms(10);
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

struct supervisor {
    pid_t program;
    int agent_fd;
    pid_t agent_pid;
    double agent_started;
    char **env;
    int button_fds[POWER_BUTTON_MAX_DEVICES];
    int button_count;
    double stop_deadline; /* > 0 once the power button asked the program to stop */
    int sent_kill;
};

/* The program's stop, as `docker stop` does it: SIGTERM now, SIGKILL after the grace period. */
static void begin_stop(struct supervisor *sup)
{
    if (sup->stop_deadline > 0)
        return; /* already stopping: a second press changes nothing */
    LOG("power button: stopping the program (SIGTERM, SIGKILL after %d s)", STOP_GRACE_MS / 1000);
    kill(sup->program, SIGTERM);
    sup->stop_deadline = monotonic_seconds() + STOP_GRACE_MS / 1000.0;
}

/* Reap children until the program ends; restart the agent if it dies; react to the power
 * button. Returns the program's wait status. */
static int supervise(struct supervisor *sup)
{
    for (;;) {
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            if (pid == sup->program) {
                program_pid = 0;
                return status;
            }
            if (pid == sup->agent_pid) {
                /* Keep the host's channel alive; back off if the agent keeps dying. */
                LOG("agent exited (status %d); restarting", status);
                if (monotonic_seconds() - sup->agent_started < 1.0)
                    sleep_ms(1000);
                sup->agent_pid = start_agent(sup->agent_fd, sup->env);
                sup->agent_started = monotonic_seconds();
            }
        }
        if (pid < 0 && errno != EINTR && errno != ECHILD)
            boot_fail("waitpid: %s", strerror(errno));

        int timeout_ms = -1;
        if (sup->stop_deadline > 0 && !sup->sent_kill) {
            double left = sup->stop_deadline - monotonic_seconds();
            if (left <= 0) {
                LOG("program did not stop within %d s; sending SIGKILL", STOP_GRACE_MS / 1000);
                kill(sup->program, SIGKILL);
                sup->sent_kill = 1;
            } else {
                timeout_ms = (int)(left * 1000) + 1;
            }
        }

        struct pollfd fds[1 + POWER_BUTTON_MAX_DEVICES];
        fds[0] = (struct pollfd){.fd = sigchld_pipe[0], .events = POLLIN};
        for (int i = 0; i < sup->button_count; i++)
            fds[1 + i] = (struct pollfd){.fd = sup->button_fds[i], .events = POLLIN};
        if (poll(fds, (nfds_t)(1 + sup->button_count), timeout_ms) < 0) {
            if (errno != EINTR)
                boot_fail("poll: %s", strerror(errno));
            continue;
        }
        if (fds[0].revents & POLLIN) {
            char drain[64];
            while (read(sigchld_pipe[0], drain, sizeof(drain)) > 0) {
            }
        }
        for (int i = sup->button_count - 1; i >= 0; i--) {
            short revents = fds[1 + i].revents;
            if ((revents & POLLIN) && power_button_pressed(sup->button_fds[i]))
                begin_stop(sup);
            if (revents & (POLLERR | POLLHUP | POLLNVAL)) { /* the device went away */
                close(sup->button_fds[i]);
                sup->button_fds[i] = sup->button_fds[--sup->button_count];
            }
        }
    }
}

int main(int argc, char **argv)
{
    if (getpid() != 1) {
        if (argc >= 3 && strcmp(argv[1], "agent") == 0) {
            int fd = open(argv[2], O_RDWR | O_NOCTTY);
            if (fd < 0) {
                fprintf(stderr, "open %s: %s\n", argv[2], strerror(errno));
                return 1;
            }
            return agent_serve(fd) == 0 ? 0 : 1;
        }
        fprintf(stderr, "usage: %s agent <device-or-socket-path>   (as PID 1: boots the guest)\n", argv[0]);
        return 2;
    }

    umask(022);
    signal(SIGPIPE, SIG_IGN);
    mount_essentials();
    attach_console();
    char cmdline[2048];
    if (read_small_file("/proc/cmdline", cmdline, sizeof(cmdline)) == 0 && strstr(cmdline, "hypeman.debug"))
        debug_enabled = 1;
    DEBUG_STEP("init started");
    load_virtio_transport();
    load_module_group("virtio_blk");
    load_module_group("virtio_console"); /* early: its ports are announced asynchronously */
    DEBUG_STEP("modules loaded");

    struct disks disks;
    wait_for_disks(&disks);
    struct hm_config config;
    char err[256];
    if (hm_config_read(disks.config, &config, err, sizeof(err)) != 0)
        boot_fail("config disk %s: %s", disks.config, err);
    struct volume_devices volume_devices[HM_MAX_VOLUMES];
    memset(volume_devices, 0, sizeof(volume_devices));
    for (size_t i = 0; i < config.volume_count; i++) {
        wait_for_serial(config.volumes[i].serial, volume_devices[i].base, sizeof(volume_devices[i].base));
        if (config.volumes[i].upper_serial)
            wait_for_serial(config.volumes[i].upper_serial, volume_devices[i].upper, sizeof(volume_devices[i].upper));
    }
    DEBUG_STEP("disks found, config read");

    const char *new_root = "/newroot";
    mount_image(disks.root, "/lower");
    DEBUG_STEP("image mounted");
    must_mount(disks.overlay, "/overlay", "ext4", MS_NOATIME, NULL);
    ensure_dir("/overlay/upper", 0755);
    ensure_dir("/overlay/work", 0755);
    load_module_group("overlay");
    must_mount("overlay", new_root, "overlay", 0, "lowerdir=/lower,upperdir=/overlay/upper,workdir=/overlay/work");

    DEBUG_STEP("overlay mounted");
    set_hostname(&config, new_root);
    configure_network(&config, new_root);
    DEBUG_STEP("network configured");
    int agent_fd = open_agent_port();
    DEBUG_STEP("agent port open");
    if (agent_fd < 0)
        LOG("agent port %s not found; running without agent", AGENT_PORT_NAME);

    /* Switch root the way switch_root(8) does (pivot_root cannot leave the initramfs). */
    initrd_root_fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (initrd_root_fd < 0)
        initrd_root_fd = AT_FDCWD; /* later module loads will fail and say so */
    move_mount("/dev", "/newroot/dev");
    move_mount("/proc", "/newroot/proc");
    move_mount("/sys", "/newroot/sys");
    move_mount("/run", "/newroot/run");
    if (chdir(new_root) != 0 || mount(new_root, "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0 ||
        chdir("/") != 0)
        boot_fail("switch to the new root: %s", strerror(errno));
    /* In the new root: a mount path through one of the image's symlinks resolves inside it. */
    mount_volumes(&config, volume_devices);
    ensure_dir("/sys/fs/cgroup", 0755);
    if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        LOG("cgroup2: %s", strerror(errno));
    if (mkdir("/tmp", 01777) == 0)
        chmod("/tmp", 01777); /* mkdir applies the umask */

    install_signal_forwarding();
    install_sigchld_wakeup();
    char **env = program_environment(&config);
    struct supervisor sup = {.agent_fd = agent_fd, .agent_pid = -1, .env = env};
    if (agent_fd >= 0) {
        sup.agent_pid = start_agent(agent_fd, env);
        sup.agent_started = monotonic_seconds();
        if (sup.agent_pid > 0)
            console_line("HYPEMAN-AGENT-READY ts=%.3f", monotonic_seconds());
    }

    sup.program = start_program(&config, env);
    /* Off the critical path: the entropy device only helps programs that start later, and
     * the power button is only pressed once the instance is up. */
    if (virtio_device_present(VIRTIO_ID_RNG))
        load_module_group("virtio_rng");
    /* The host inflates the balloon only when it reclaims memory, never during a boot: the
     * driver takes a request made before it loaded when it probes the device. */
    if (virtio_device_present(VIRTIO_ID_BALLOON))
        load_module_group("virtio_balloon");
    load_module_group("button");
    load_module_group("evdev");
    sup.button_count = power_button_open(sup.button_fds, POWER_BUTTON_MAX_DEVICES);
    DEBUG_STEP("power button: %d input device(s)", sup.button_count);
    if (sup.button_count == 0)
        LOG("no power button input device; graceful shutdown will not work");
    int status = supervise(&sup);
    program_pid = 0;

    int code;
    char message[128];
    if (WIFEXITED(status)) {
        code = WEXITSTATUS(status);
        if (code == 0)
            snprintf(message, sizeof(message), "exited normally");
        else
            snprintf(message, sizeof(message), "exited with code %d", code);
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        code = 128 + sig;
        snprintf(message, sizeof(message), "killed by signal %d (%s)", sig, strsignal(sig));
    } else {
        code = 255;
        snprintf(message, sizeof(message), "ended with wait status %#x", status);
    }
    stop_remaining_processes(sup.agent_pid);
    exit_marker_and_power_off(code, message);
}
