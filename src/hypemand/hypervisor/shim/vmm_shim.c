/*
 * hypeman-vmm-shim: starts one VMM, waits for it, and records on disk how it ended.
 *
 *   hypeman-vmm-shim <report-fd>[,<vmm-fd>...] <exit-file> <vmm-binary> [vmm args...]
 *
 * The server starts this in the VM directory (cwd), in a new session, with stdin on /dev/null,
 * stdout and stderr on the VMM log, and no other descriptor but <report-fd> and the <vmm-fd>s
 * (the VM's TAP, which lives in another network namespace, so the VMM cannot open it itself).
 * VMMs outlive the server, so only something that lives exactly as long as the VMM can see its
 * exit status; that is this program, and nothing else: it does not restart, log or talk to anyone.
 *
 * 1. Reserve one block for the exit record at once: the VMM's end is most interesting when the
 *    disk is full, and a record written then must not need new blocks.
 * 2. fork; the child execs the VMM with exactly the given argv (the server identifies the VMM by
 *    its /proc/<pid>/cmdline and cwd, so nothing may be added), keeping the <vmm-fd>s under their
 *    numbers. The shim closes its own copies right after the fork: only the VMM holds them, so
 *    when it dies a TAP is free at once for the next VMM (a TAP takes one opener at a time).
 * 3. Once exec succeeded, write "<vmm pid>\n" to <report-fd> and close it. An exec failure is
 *    printed to stderr and reported by closing the descriptor without a pid.
 * 4. Forward SIGTERM, SIGINT, SIGHUP and SIGQUIT to the VMM (a signal to the process group means
 *    the VMM), and wait for it.
 * 5. Write <exit-file> atomically: pid, start time, exit code or signal, the time, and the last
 *    line the VMM wrote to its log during this run. Then exit with the VMM's code (or 128+signal).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RECORD_MAX 2048
#define VMM_FDS_MAX 8
#define DETAIL_MAX 400
#define TAIL_READ 1024

static volatile pid_t vmm_pid;
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
#define N_FORWARDED (sizeof(forwarded) / sizeof(forwarded[0]))

static void forward(int sig) {
    int saved = errno;
    if (vmm_pid > 0)
        kill(vmm_pid, sig);
    errno = saved;
}

static const char *signal_name(int sig) {
    static const struct { int number; const char *name; } names[] = {
        {SIGHUP, "SIGHUP"},   {SIGINT, "SIGINT"},     {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"},
        {SIGTRAP, "SIGTRAP"}, {SIGABRT, "SIGABRT"},   {SIGBUS, "SIGBUS"},   {SIGFPE, "SIGFPE"},
        {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"},   {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"},
        {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"},   {SIGTERM, "SIGTERM"}, {SIGXCPU, "SIGXCPU"},
        {SIGXFSZ, "SIGXFSZ"}, {SIGVTALRM, "SIGVTALRM"}, {SIGPROF, "SIGPROF"}, {SIGSYS, "SIGSYS"},
        {SIGPWR, "SIGPWR"},   {SIGSTKFLT, "SIGSTKFLT"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (names[i].number == sig)
            return names[i].name;
    return NULL;
}

/* Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, the process' identity. */
static long long start_time_of(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (p == NULL)
        return -1;
    p += 2; /* field 3 starts here */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    return strtoll(p, NULL, 10);
}

static off_t log_size(void) {
    struct stat st;
    if (fstat(STDOUT_FILENO, &st) != 0 || !S_ISREG(st.st_mode))
        return -1;
    return st.st_size;
}

/* The last non-empty line written to the log since `from`, JSON-escaped into `out` (ASCII only:
   anything else becomes '?', so the record is always valid UTF-8). Empty if there is none. */
static void last_log_line(off_t from, char *out, size_t out_size) {
    out[0] = '\0';
    off_t end = log_size();
    if (from < 0 || end <= from)
        return;
    off_t start = end - from > TAIL_READ ? end - TAIL_READ : from;
    char buf[TAIL_READ + 1];
    /* The log is open write-only (append): read it through a descriptor of our own. */
    int log_fd = open("/proc/self/fd/1", O_RDONLY | O_CLOEXEC);
    if (log_fd < 0)
        return;
    ssize_t n = pread(log_fd, buf, (size_t)(end - start), start);
    close(log_fd);
    if (n <= 0)
        return;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        n--;
    ssize_t begin = n;
    while (begin > 0 && buf[begin - 1] != '\n')
        begin--;
    if (n - begin > DETAIL_MAX)
        begin = n - DETAIL_MAX;
    size_t o = 0;
    for (ssize_t i = begin; i < n && o + 7 < out_size; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, out_size - o, "\\u%04x", c);
        } else {
            out[o++] = c < 0x7f ? (char)c : '?';
        }
    }
    out[o] = '\0';
}

static void utc_now(char *out, size_t out_size) {
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    size_t n = strftime(out, out_size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, out_size - n, ".%06ldZ", now.tv_nsec / 1000);
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* "<report-fd>[,<vmm-fd>...]": each an open descriptor above stderr. Returns the count of
   VMM descriptors, or -1 (with a message) for anything else. */
static int parse_fds(const char *text, int *report_fd, int vmm_fds[VMM_FDS_MAX]) {
    int count = -1; /* the first number is the report fd */
    const char *p = text;
    for (;;) {
        char *end;
        errno = 0;
        long fd = strtol(p, &end, 10);
        if (end == p || errno != 0 || fd <= 2 || fd > 65535 || (*end != ',' && *end != '\0')) {
            fprintf(stderr, "hypeman-vmm-shim: bad descriptor list %s\n", text);
            return -1;
        }
        if (fcntl((int)fd, F_GETFD) < 0) {
            fprintf(stderr, "hypeman-vmm-shim: descriptor %ld is not open\n", fd);
            return -1;
        }
        if (count < 0) {
            *report_fd = (int)fd;
        } else if (count == VMM_FDS_MAX) {
            fprintf(stderr, "hypeman-vmm-shim: more than %d descriptors for the VMM\n", VMM_FDS_MAX);
            return -1;
        } else {
            vmm_fds[count] = (int)fd;
        }
        count++;
        if (*end == '\0')
            return count;
        p = end + 1;
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s <report-fd>[,<vmm-fd>...] <exit-file> <vmm-binary> [args...]\n", argv[0]);
        return 2;
    }
    int report_fd = -1, vmm_fds[VMM_FDS_MAX];
    int n_vmm_fds = parse_fds(argv[1], &report_fd, vmm_fds);
    if (n_vmm_fds < 0)
        return 2;
    const char *exit_file = argv[2];
    char reserved[4096]; /* the record is written here, then renamed into place */
    if (snprintf(reserved, sizeof(reserved), ".%s.reserved", exit_file) >= (int)sizeof(reserved))
        return 2;

    int record_fd = open(reserved, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (record_fd < 0)
        fprintf(stderr, "hypeman-vmm-shim: %s: %s\n", reserved, strerror(errno));
    else
        (void)posix_fallocate(record_fd, 0, RECORD_MAX); /* best effort: some filesystems cannot */
    off_t log_start = log_size();

    /* Blocked until the pid to forward to is known; the child unblocks them before exec. */
    sigset_t forwarded_set, old_mask;
    sigemptyset(&forwarded_set);
    for (size_t i = 0; i < N_FORWARDED; i++)
        sigaddset(&forwarded_set, forwarded[i]);
    sigprocmask(SIG_BLOCK, &forwarded_set, &old_mask);

    int exec_pipe[2];
    if (pipe2(exec_pipe, O_CLOEXEC) != 0) {
        perror("hypeman-vmm-shim: pipe2");
        return 127;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("hypeman-vmm-shim: fork");
        return 127;
    }
    if (child == 0) {
        close(exec_pipe[0]);
        close(report_fd);
        /* Inherited open across exec whatever flag they came with: the VMM's command line names them. */
        for (int i = 0; i < n_vmm_fds; i++)
            fcntl(vmm_fds[i], F_SETFD, fcntl(vmm_fds[i], F_GETFD) & ~FD_CLOEXEC);
        sigprocmask(SIG_SETMASK, &old_mask, NULL);
        execv(argv[3], argv + 3);
        int err = errno;
        (void)write_all(exec_pipe[1], (const char *)&err, sizeof(err));
        _exit(127);
    }
    vmm_pid = child;
    for (int i = 0; i < n_vmm_fds; i++)
        close(vmm_fds[i]); /* the VMM's alone from here on */
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = forward;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < N_FORWARDED; i++)
        sigaction(forwarded[i], &action, NULL);
    /* The server may be gone by now: a closed report pipe must not kill us. */
    signal(SIGPIPE, SIG_IGN);
    sigprocmask(SIG_SETMASK, &old_mask, NULL);

    close(exec_pipe[1]);
    int exec_errno = 0;
    ssize_t got;
    do {
        got = read(exec_pipe[0], &exec_errno, sizeof(exec_errno));
    } while (got < 0 && errno == EINTR);
    close(exec_pipe[0]);
    if (got > 0) {
        fprintf(stderr, "hypeman-vmm-shim: cannot run %s: %s\n", argv[3], strerror(exec_errno));
        waitpid(child, NULL, 0);
        if (record_fd >= 0) {
            close(record_fd);
            unlink(reserved);
        }
        return 127;
    }
    long long start_time = start_time_of(child);
    char pid_line[32];
    int len = snprintf(pid_line, sizeof(pid_line), "%d\n", (int)child);
    (void)write_all(report_fd, pid_line, (size_t)len);
    close(report_fd);

    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) {
            perror("hypeman-vmm-shim: waitpid");
            return 127;
        }
    }

    char at[64], detail[DETAIL_MAX * 6 + 8], code[16] = "null", sig_number[16] = "null", sig_name[32] = "null";
    utc_now(at, sizeof(at));
    last_log_line(log_start, detail, sizeof(detail));
    int core_dumped = 0, shim_code;
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        const char *name = signal_name(sig);
        snprintf(sig_number, sizeof(sig_number), "%d", sig);
        if (name != NULL)
            snprintf(sig_name, sizeof(sig_name), "\"%s\"", name);
        else
            snprintf(sig_name, sizeof(sig_name), "\"SIG%d\"", sig);
        core_dumped = WCOREDUMP(status) ? 1 : 0;
        shim_code = 128 + sig;
    } else {
        shim_code = WEXITSTATUS(status);
        snprintf(code, sizeof(code), "%d", shim_code);
    }

    char record[RECORD_MAX + DETAIL_MAX * 6];
    int n = snprintf(record, sizeof(record),
                     "{\"pid\": %d, \"start_time\": %lld, \"code\": %s, \"signal\": %s, \"signal_number\": %s, "
                     "\"core_dumped\": %s, \"at\": \"%s\", \"detail\": %s%s%s}\n",
                     (int)child, start_time, code, sig_name, sig_number, core_dumped ? "true" : "false", at,
                     detail[0] ? "\"" : "", detail[0] ? detail : "null", detail[0] ? "\"" : "");
    if (record_fd < 0 || n < 0 || (size_t)n >= sizeof(record)) {
        fprintf(stderr, "hypeman-vmm-shim: cannot record the exit: %s", record);
        return shim_code;
    }
    if (pwrite(record_fd, record, (size_t)n, 0) != n || ftruncate(record_fd, n) != 0 || fsync(record_fd) != 0 ||
        rename(reserved, exit_file) != 0) {
        fprintf(stderr, "hypeman-vmm-shim: writing %s failed (%s): %s", exit_file, strerror(errno), record);
        close(record_fd);
        unlink(reserved);
        return shim_code;
    }
    close(record_fd);
    int dir_fd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
        fsync(dir_fd);
        close(dir_fd);
    }
    return shim_code;
}
