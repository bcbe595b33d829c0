/* Guest agent: serves exec, file copy, stat and clock requests from the host over one byte stream
 * (the virtio-serial port), multiplexing many sessions. Single-threaded poll() loop; every fd is
 * non-blocking; all buffers are bounded by per-session credit windows (see guest/README.md).
 *
 * Nothing that touches the file system runs in the loop: open() of a FIFO, read() of /proc/kmsg,
 * stat() on a hung FUSE or NFS mount can block for good, and the loop serves every session. Each
 * file request (STAT, MKDIR, SYMLINK, GET, PUT) is served by a worker process forked for it, which
 * runs the same handlers below against a pipe instead of the port and exits with its session; the
 * loop relays its frames (under the session's credit) and can kill it at any time. An exec waits
 * for its child's execvp (which may block on a hung cwd) through a pipe in the loop too. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "agent_proto.h"
#include "netconf.h"

#include <arpa/inet.h>
#include <net/if.h>

#define MAX_SESSIONS 256
#define READ_CHUNK 32768
/* Producers (pipes, files) only add a data frame while the outbound buffer is below this. */
#define OUT_PRODUCE_LIMIT (512 * 1024)
/* Above this we stop reading requests from the host until the host reads our replies. */
#define OUT_HARD_LIMIT (4 * 1024 * 1024)
#define STDIN_QUEUE_LIMIT (2 * AP_INITIAL_WINDOW)
/* After the child exits, output still in flight is read until the pipes stay idle this long
 * (a background grandchild may keep them open forever). */
#define EXIT_DRAIN_MS 300
#define RECONNECT_CHECK_MS 100
#define GET_MAX_DEPTH 128
/* A file read that returns EAGAIN (/proc/kmsg, a FIFO swapped in after the stat) and then stays
 * without data this long ends the entry with an error: such a file has no end to copy up to. */
#define GET_IDLE_READ_MS 5000
/* How much of a worker's output the loop holds before it stops reading the worker's pipe (the
 * worker then blocks on the full pipe: that is its flow control). */
#define WORK_FROM_LIMIT (2 * (AP_HEADER_LEN + AP_MAX_PAYLOAD))
/* Frames queued for a PUT worker; the host's window keeps it below about AP_INITIAL_WINDOW. */
#define WORK_TO_LIMIT (2 * AP_INITIAL_WINDOW + 64 * AP_HEADER_LEN)

struct buf {
    uint8_t *p;
    size_t off, len, cap;
};

/* S_WORK lives in the loop (a worker relaying a file request); S_PUT and S_GET only inside a worker. */
enum kind { S_FREE = 0, S_EXEC, S_PUT, S_GET, S_WORK };

struct exec_state {
    pid_t pid;
    int tty;
    int in_fd, out_fd, err_fd; /* for a tty all three are the pty master (closed once) */
    struct buf stdin_q;
    int stdin_eof;             /* host asked to close stdin once the queue drains */
    int exited, status, timed_out;
    int pty_eof;               /* the pty master reported EIO: the slave side is all closed */
    int64_t deadline;          /* timeout, ms on the monotonic clock; 0 = none */
    int64_t drain_until;       /* after exit: give up on pipes at this time */
    int status_fd;             /* until execvp: closes on success, carries its errno on failure */
    int started;               /* STARTED was sent (EXIT never precedes it) */
    char *what;                /* "exec <argv0> (cwd <dir>)", for the ERROR of a failed start */
};

struct put_state {
    int fd;
    char *tmp_path, *path;
    uint32_t mode;
    int32_t uid, gid;
    int has_mtime;
    int64_t mtime_ns;
    uint64_t written;
};

/* A worker serving one file request; the loop relays its frames to the host and the host's
 * FILE_DATA / FILE_END to it. */
struct work_state {
    pid_t pid;
    int from_fd;      /* the worker's frames (read end, non-blocking) */
    int to_fd;        /* frames for the worker (write end, non-blocking); -1 unless PUT */
    int is_put;       /* a PUT worker cleans up its temporary file itself: never SIGKILLed */
    struct buf from_q, to_q;
};

struct get_state {
    int started;
    int follow, recursive;
    char *path;
    DIR *stack[GET_MAX_DEPTH];
    size_t rel_len[GET_MAX_DEPTH];
    int depth;
    int file_fd;
    int64_t idle_since; /* first EAGAIN of the current file since it last gave data; 0 = none */
    char rel[PATH_MAX];
};

struct session {
    int kind;
    uint32_t id;
    uint32_t credit; /* data bytes we may still send to the host */
    union {
        struct exec_state x;
        struct put_state put;
        struct get_state *get;
        struct work_state w;
    } u;
};

static struct session sessions[MAX_SESSIONS];
static struct buf out, in;
static int port_fd = -1;
static int connected = 1, hunting = 1, port_is_stream;
static int64_t reconnect_check_at;
static int sigchld_pipe[2] = {-1, -1};
static uint8_t scratch[AP_MAX_PAYLOAD];
/* Set in a worker process: file requests are served here rather than handed to a new worker. */
static int in_worker;

/* ---------- small helpers ---------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int buf_reserve(struct buf *b, size_t extra)
{
    if (b->off + b->len + extra <= b->cap)
        return 0;
    if (b->off) {
        memmove(b->p, b->p + b->off, b->len);
        b->off = 0;
    }
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 16384;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    b->len -= n;
    if (b->len == 0)
        b->off = 0;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

static void put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static void put_be32(uint8_t *p, uint32_t v) { put_be16(p, v >> 16); put_be16(p + 2, (uint16_t)v); }
static void put_be64(uint8_t *p, uint64_t v) { put_be32(p, v >> 32); put_be32(p + 4, (uint32_t)v); }
static uint16_t get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get_be32(const uint8_t *p) { return (uint32_t)get_be16(p) << 16 | get_be16(p + 2); }
static uint64_t get_be64(const uint8_t *p) { return (uint64_t)get_be32(p) << 32 | get_be32(p + 4); }

/* Bounds-checked payload reader: any overrun sets bad and yields zeros / NULL. */
struct rd {
    const uint8_t *p;
    size_t n, pos;
    int bad;
};

static const uint8_t *rd_take(struct rd *r, size_t k)
{
    if (r->bad || r->n - r->pos < k) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *q = r->p + r->pos;
    r->pos += k;
    return q;
}
static uint8_t rd_u8(struct rd *r) { const uint8_t *q = rd_take(r, 1); return q ? q[0] : 0; }
static uint16_t rd_u16(struct rd *r) { const uint8_t *q = rd_take(r, 2); return q ? get_be16(q) : 0; }
static uint32_t rd_u32(struct rd *r) { const uint8_t *q = rd_take(r, 4); return q ? get_be32(q) : 0; }
static uint64_t rd_u64(struct rd *r) { const uint8_t *q = rd_take(r, 8); return q ? get_be64(q) : 0; }

/* A NUL-terminated string inside the payload (the payload lives in `in`, writable). */
static char *rd_str(struct rd *r)
{
    if (r->bad)
        return NULL;
    const uint8_t *start = r->p + r->pos;
    const uint8_t *nul = memchr(start, 0, r->n - r->pos);
    if (!nul) {
        r->bad = 1;
        return NULL;
    }
    r->pos += (size_t)(nul - start) + 1;
    return (char *)start;
}

struct wr {
    uint8_t *p;
    size_t n;
    int bad;
};

static uint8_t *wr_take(struct wr *w, size_t k)
{
    if (w->bad || AP_MAX_PAYLOAD - w->n < k) {
        w->bad = 1;
        return NULL;
    }
    uint8_t *q = w->p + w->n;
    w->n += k;
    return q;
}
static void wr_u8(struct wr *w, uint8_t v) { uint8_t *q = wr_take(w, 1); if (q) q[0] = v; }
static void wr_u32(struct wr *w, uint32_t v) { uint8_t *q = wr_take(w, 4); if (q) put_be32(q, v); }
static void wr_u64(struct wr *w, uint64_t v) { uint8_t *q = wr_take(w, 8); if (q) put_be64(q, v); }
static void wr_str(struct wr *w, const char *s)
{
    size_t k = strlen(s) + 1;
    uint8_t *q = wr_take(w, k);
    if (q)
        memcpy(q, s, k);
}

static struct wr wr_begin(void)
{
    struct wr w = {scratch, 0, 0};
    return w;
}

/* ---------- outbound frames ---------- */

static void send_frame(uint32_t session, uint8_t type, const void *payload, size_t len)
{
    if (!connected)
        return; /* nobody listens; the host starts afresh with HELLO */
    if (buf_reserve(&out, AP_HEADER_LEN + len) < 0)
        return;
    uint8_t *h = out.p + out.off + out.len;
    put_be32(h, (uint32_t)len);
    put_be32(h + 4, session);
    h[8] = type;
    if (len)
        memcpy(h + AP_HEADER_LEN, payload, len);
    out.len += AP_HEADER_LEN + len;
}

static void send_wr(uint32_t session, uint8_t type, struct wr *w)
{
    send_frame(session, type, w->p, w->bad ? 0 : w->n);
}

static void send_empty(uint32_t session, uint8_t type) { send_frame(session, type, NULL, 0); }

static void send_error(uint32_t session, int err, const char *what)
{
    struct wr w = wr_begin();
    wr_u32(&w, (uint32_t)err);
    char msg[1024];
    if (err)
        snprintf(msg, sizeof(msg), "%s: %s", what, strerror(err));
    else
        snprintf(msg, sizeof(msg), "%s", what);
    wr_str(&w, msg);
    send_wr(session, AP_ERROR, &w);
}

/* An ERROR whose message already says what went wrong (netconf's reasons include strerror). */
static void send_error_text(uint32_t session, int err, const char *text)
{
    struct wr w = wr_begin();
    wr_u32(&w, (uint32_t)err);
    wr_str(&w, text);
    send_wr(session, AP_ERROR, &w);
}

static void send_window(uint32_t session, uint32_t n)
{
    uint8_t p[4];
    if (!n)
        return;
    put_be32(p, n);
    send_frame(session, AP_WINDOW, p, 4);
}

/* In a worker: hand everything queued to the loop (a blocking pipe write). -1 once the loop has
 * dropped the session (EPIPE). */
static int worker_flush(void)
{
    while (out.len) {
        ssize_t n = write(port_fd, out.p + out.off, out.len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf_consume(&out, (size_t)n);
    }
    return 0;
}

static int is_terminal(uint8_t type)
{
    return type == AP_PONG || type == AP_EXIT || type == AP_PUT_DONE || type == AP_GET_DONE ||
           type == AP_STAT_RESULT || type == AP_OK || type == AP_ERROR;
}

static int can_produce(const struct session *s)
{
    return connected && s->credit > 0 && out.len < OUT_PRODUCE_LIMIT;
}

/* Read up to the session's credit from fd straight into the outbound buffer as one data frame.
 * Returns bytes read, 0 on EOF, -1 on EAGAIN, -2 on error. */
static ssize_t produce_from_fd(struct session *s, int fd, uint8_t type)
{
    size_t want = s->credit < READ_CHUNK ? s->credit : READ_CHUNK;
    if (buf_reserve(&out, AP_HEADER_LEN + want) < 0)
        return -1;
    uint8_t *h = out.p + out.off + out.len;
    ssize_t n;
    do
        n = read(fd, h + AP_HEADER_LEN, want);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? -1 : -2;
    if (n == 0)
        return 0;
    put_be32(h, (uint32_t)n);
    put_be32(h + 4, s->id);
    h[8] = type;
    out.len += AP_HEADER_LEN + (size_t)n;
    s->credit -= (uint32_t)n;
    return n;
}

/* ---------- sessions ---------- */

static struct session *find_session(uint32_t id)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].kind != S_FREE && sessions[i].id == id)
            return &sessions[i];
    return NULL;
}

static struct session *new_session(uint32_t id, int kind)
{
    if (id == 0 || find_session(id)) {
        send_error(id, EEXIST, "session id in use");
        return NULL;
    }
    for (int i = 0; i < MAX_SESSIONS; i++) {
        if (sessions[i].kind == S_FREE) {
            struct session *s = &sessions[i];
            memset(s, 0, sizeof(*s));
            s->kind = kind;
            s->id = id;
            s->credit = AP_INITIAL_WINDOW;
            return s;
        }
    }
    send_error(id, EAGAIN, "too many sessions");
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void exec_close_fds(struct exec_state *x)
{
    if (x->tty) {
        close_fd(&x->out_fd);
        x->in_fd = x->err_fd = -1;
    } else {
        close_fd(&x->in_fd);
        close_fd(&x->out_fd);
        close_fd(&x->err_fd);
    }
}

static void get_free(struct get_state *g)
{
    if (!g)
        return;
    for (int i = 0; i < g->depth; i++)
        closedir(g->stack[i]);
    if (g->file_fd >= 0)
        close(g->file_fd);
    free(g->path);
    free(g);
}

static void put_abort(struct put_state *p)
{
    close_fd(&p->fd);
    if (p->tmp_path)
        unlink(p->tmp_path);
    free(p->tmp_path);
    free(p->path);
    p->tmp_path = p->path = NULL;
}

static void work_close(struct work_state *w)
{
    close_fd(&w->from_fd);
    close_fd(&w->to_fd);
    buf_free(&w->from_q);
    buf_free(&w->to_q);
}

/* Free a session without any reply; kills an exec child's whole process group and a worker that
 * may be stuck. A PUT worker is not killed: it sees its input close, deletes its temporary file
 * and exits (if a hung file system holds it, whenever that returns). */
static void drop_session(struct session *s)
{
    switch (s->kind) {
    case S_EXEC:
        if (!s->u.x.exited && s->u.x.pid > 0) {
            kill(-s->u.x.pid, SIGKILL);
            kill(s->u.x.pid, SIGKILL);
        }
        exec_close_fds(&s->u.x);
        close_fd(&s->u.x.status_fd);
        free(s->u.x.what);
        buf_free(&s->u.x.stdin_q);
        break;
    case S_WORK:
        if (!s->u.w.is_put && s->u.w.pid > 0)
            kill(s->u.w.pid, SIGKILL);
        work_close(&s->u.w);
        break;
    case S_PUT:
        put_abort(&s->u.put);
        break;
    case S_GET:
        get_free(s->u.get);
        break;
    default:
        break;
    }
    s->kind = S_FREE;
}

static void drop_all_sessions(void)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].kind != S_FREE)
            drop_session(&sessions[i]);
}

/* ---------- exec ---------- */

static void exec_signal(struct exec_state *x, int sig)
{
    if (x->exited || x->pid <= 0)
        return;
    if (kill(-x->pid, sig) < 0)
        kill(x->pid, sig);
}

static void child_fail(int status_fd, int err)
{
    ssize_t r = write(status_fd, &err, sizeof(err));
    (void)r;
    _exit(127);
}

static void handle_exec(uint32_t id, struct rd *r)
{
    uint8_t flags = rd_u8(r);
    uint16_t rows = rd_u16(r), cols = rd_u16(r);
    uint32_t timeout_ms = rd_u32(r);
    uint16_t argc = rd_u16(r), envc = rd_u16(r);
    char *cwd = rd_str(r);
    char **argv = calloc((size_t)argc + 1, sizeof(char *));
    char **envv = calloc((size_t)envc + 1, sizeof(char *));
    if (!argv || !envv) {
        send_error(id, ENOMEM, "exec");
        goto out;
    }
    for (unsigned i = 0; i < argc; i++)
        argv[i] = rd_str(r);
    for (unsigned i = 0; i < envc; i++)
        envv[i] = rd_str(r);
    if (r->bad || argc == 0) {
        send_error(id, EINVAL, "malformed exec request");
        goto out;
    }
    struct session *s = new_session(id, S_EXEC);
    if (!s)
        goto out;
    struct exec_state *x = &s->u.x;
    x->in_fd = x->out_fd = x->err_fd = x->status_fd = -1;
    x->tty = flags & AP_EXEC_TTY;
    int merge = flags & AP_EXEC_MERGE_STDERR;
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, pstatus[2] = {-1, -1};
    char slave_name[128] = "";
    int master = -1;
    if (x->tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            ptsname_r(master, slave_name, sizeof(slave_name)) != 0) {
            int e = errno;
            if (master >= 0)
                close(master);
            send_error(id, e, "open pty");
            s->kind = S_FREE;
            goto out;
        }
        struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
        ioctl(master, TIOCSWINSZ, &ws);
    } else if (pipe2(pin, O_CLOEXEC) < 0 || pipe2(pout, O_CLOEXEC) < 0 ||
               (!merge && pipe2(perr, O_CLOEXEC) < 0)) {
        int e = errno;
        for (int i = 0; i < 2; i++) {
            close_fd(&pin[i]);
            close_fd(&pout[i]);
            close_fd(&perr[i]);
        }
        send_error(id, e, "pipe");
        s->kind = S_FREE;
        goto out;
    }
    if (pipe2(pstatus, O_CLOEXEC) < 0) {
        pstatus[0] = pstatus[1] = -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        setsid();
        if (x->tty) {
            int slave = open(slave_name, O_RDWR);
            if (slave < 0)
                child_fail(pstatus[1], errno);
            ioctl(slave, TIOCSCTTY, 0);
            dup2(slave, 0);
            dup2(slave, 1);
            dup2(slave, 2);
            if (slave > 2)
                close(slave);
            if (!getenv("TERM"))
                setenv("TERM", "xterm", 1);
        } else {
            dup2(pin[0], 0);
            dup2(pout[1], 1);
            dup2(merge ? pout[1] : perr[1], 2);
        }
        for (unsigned i = 0; i < envc; i++) {
            if (strchr(envv[i], '='))
                putenv(envv[i]);
            else
                unsetenv(envv[i]);
        }
        if (cwd[0] && chdir(cwd) < 0)
            child_fail(pstatus[1], errno);
        execvp(argv[0], argv);
        child_fail(pstatus[1], errno);
    }
    int fork_err = errno;
    close_fd(&pin[0]);
    close_fd(&pout[1]);
    close_fd(&perr[1]);
    close_fd(&pstatus[1]);
    if (pid < 0) {
        close_fd(&pin[1]);
        close_fd(&pout[0]);
        close_fd(&perr[0]);
        close_fd(&pstatus[0]);
        if (master >= 0)
            close(master);
        send_error(id, fork_err, "fork");
        s->kind = S_FREE;
        goto out;
    }
    x->pid = pid;
    /* The status pipe closes on a successful exec (CLOEXEC) or carries the child's errno. It is
     * read in the loop (exec_check_started): chdir or execvp on a hung mount may take forever. */
    x->status_fd = pstatus[0];
    char what[600];
    snprintf(what, sizeof(what), "exec %.256s (cwd %.256s)", argv[0], cwd[0] ? cwd : "/");
    x->what = strdup(what);
    if (x->tty) {
        x->in_fd = x->out_fd = master;
    } else {
        x->in_fd = pin[1];
        x->out_fd = pout[0];
        x->err_fd = perr[0];
    }
    int fds[4] = {x->in_fd, x->out_fd, x->err_fd, x->status_fd};
    for (int i = 0; i < 4; i++)
        if (fds[i] >= 0 && fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK) < 0) {
            send_error(id, errno, "fcntl");
            drop_session(s);
            goto out;
        }
    if (timeout_ms)
        x->deadline = now_ms() + timeout_ms;
    if (x->status_fd < 0) { /* no status pipe (pipe2 failed): report the start at once */
        x->started = 1;
        uint8_t p[4];
        put_be32(p, (uint32_t)pid);
        send_frame(id, AP_STARTED, p, 4);
    }
out:
    free(argv);
    free(envv);
}

static void exec_stdin(struct session *s, const uint8_t *data, size_t n)
{
    struct exec_state *x = &s->u.x;
    if (x->in_fd < 0 || x->stdin_eof || x->stdin_q.len + n > STDIN_QUEUE_LIMIT) {
        send_window(s->id, (uint32_t)n); /* discarded: hand the credit straight back */
        return;
    }
    if (buf_reserve(&x->stdin_q, n) < 0) {
        send_window(s->id, (uint32_t)n);
        return;
    }
    memcpy(x->stdin_q.p + x->stdin_q.off + x->stdin_q.len, data, n);
    x->stdin_q.len += n;
}

static void exec_close_stdin(struct exec_state *x)
{
    if (x->tty) {
        /* A terminal has no half-close: deliver the EOF character to the line discipline. */
        static const uint8_t eot = 4;
        ssize_t r = write(x->in_fd, &eot, 1);
        (void)r;
        return;
    }
    close_fd(&x->in_fd);
}

static void exec_flush_stdin(struct session *s)
{
    struct exec_state *x = &s->u.x;
    while (x->in_fd >= 0 && x->stdin_q.len) {
        ssize_t n = write(x->in_fd, x->stdin_q.p + x->stdin_q.off, x->stdin_q.len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) { /* reader gone: discard and return the credit */
            send_window(s->id, (uint32_t)x->stdin_q.len);
            buf_consume(&x->stdin_q, x->stdin_q.len);
            if (!x->tty)
                close_fd(&x->in_fd);
            break;
        }
        buf_consume(&x->stdin_q, (size_t)n);
        send_window(s->id, (uint32_t)n);
    }
    if (x->stdin_eof == 1 && !x->stdin_q.len) {
        x->stdin_eof = 2;
        if (x->in_fd >= 0)
            exec_close_stdin(x);
    }
}

/* The status pipe is readable: EOF means execvp succeeded (STARTED), an int is its errno (ERROR,
 * and the session ends; the child exits with 127 and is reaped like any other). */
static void exec_check_started(struct session *s)
{
    struct exec_state *x = &s->u.x;
    int child_err = 0;
    ssize_t n;
    do
        n = read(x->status_fd, &child_err, sizeof(child_err));
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    close_fd(&x->status_fd);
    if (n == (ssize_t)sizeof(child_err) && child_err) {
        send_error(s->id, child_err, x->what ? x->what : "exec");
        drop_session(s);
        return;
    }
    x->started = 1;
    uint8_t p[4];
    put_be32(p, (uint32_t)x->pid);
    send_frame(s->id, AP_STARTED, p, 4);
}

/* Output may still arrive from the child (or whatever holds its pipes / terminal). */
static int exec_output_open(const struct exec_state *x)
{
    if (x->tty)
        return x->out_fd >= 0 && !x->pty_eof;
    return x->out_fd >= 0 || x->err_fd >= 0;
}

static void exec_finish_if_done(struct session *s)
{
    struct exec_state *x = &s->u.x;
    if (!x->started || !x->exited || exec_output_open(x))
        return;
    uint8_t p[6];
    if (WIFSIGNALED(x->status)) {
        p[0] = 1;
        put_be32(p + 1, (uint32_t)WTERMSIG(x->status));
    } else {
        p[0] = 0;
        put_be32(p + 1, (uint32_t)WEXITSTATUS(x->status));
    }
    p[5] = (uint8_t)x->timed_out;
    send_frame(s->id, AP_EXIT, p, sizeof(p));
    drop_session(s);
}

/* One read from an output fd; handles EOF. */
static void exec_pump(struct session *s, int *fd, uint8_t type)
{
    struct exec_state *x = &s->u.x;
    if (*fd < 0 || !can_produce(s))
        return;
    ssize_t n = produce_from_fd(s, *fd, type);
    if (n == -1)
        return;
    if (n > 0) {
        if (x->exited)
            x->drain_until = now_ms() + EXIT_DRAIN_MS;
        return;
    }
    if (x->tty) {
        /* EIO: every slave fd is closed. The child may not have exited yet (programs close
         * stdio before _exit); closing the master now would hang up the terminal and kill it
         * with SIGHUP. Stop reading; the master is closed once the child has been reaped. */
        x->pty_eof = 1;
    } else {
        close_fd(fd);
    }
}

static void reap_children(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &sessions[i];
            if (s->kind == S_EXEC && s->u.x.pid == pid && !s->u.x.exited) {
                s->u.x.exited = 1;
                s->u.x.status = status;
                s->u.x.drain_until = now_ms() + EXIT_DRAIN_MS;
                /* The process group may outlive its leader (background jobs); a timed-out or
                 * finished session must not leave them holding the pipes. Leave them be otherwise. */
                if (s->u.x.timed_out)
                    kill(-pid, SIGKILL);
            }
        }
    }
}

/* ---------- files ---------- */

static int mkdir_parents(char *path, mode_t mode)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        int rc = mkdir(path, mode);
        int e = errno;
        *p = '/';
        if (rc < 0 && e != EEXIST)
            return -1;
    }
    return 0;
}

static int64_t stat_mtime_ns(const struct stat *st)
{
    return (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
}

static void ns_to_timespec(int64_t ns, struct timespec *ts)
{
    ts->tv_sec = ns / 1000000000;
    ts->tv_nsec = ns % 1000000000;
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += 1000000000;
        ts->tv_sec -= 1;
    }
}

static void handle_put(uint32_t id, struct rd *r)
{
    uint32_t mode = rd_u32(r);
    int32_t uid = (int32_t)rd_u32(r), gid = (int32_t)rd_u32(r);
    uint8_t flags = rd_u8(r);
    int64_t mtime = (int64_t)rd_u64(r);
    char *path = rd_str(r);
    if (r->bad || path[0] != '/') {
        send_error(id, EINVAL, "put: need an absolute path");
        return;
    }
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        send_error(id, EISDIR, path);
        return;
    }
    struct session *s = new_session(id, S_PUT);
    if (!s)
        return;
    struct put_state *p = &s->u.put;
    p->fd = -1;
    p->mode = mode & 07777;
    p->uid = uid;
    p->gid = gid;
    p->has_mtime = flags & AP_PUT_HAS_MTIME;
    p->mtime_ns = mtime;
    p->path = strdup(path);
    size_t n = strlen(path) + 32;
    p->tmp_path = malloc(n);
    if (!p->path || !p->tmp_path) {
        send_error(id, ENOMEM, "put");
        drop_session(s);
        return;
    }
    /* Write beside the target and rename at the end: a dropped transfer never leaves a torn file. */
    snprintf(p->tmp_path, n, "%s.hypeman-XXXXXX", path);
    mkdir_parents(p->path, 0755);
    p->fd = mkostemp(p->tmp_path, O_CLOEXEC);
    if (p->fd < 0) {
        int e = errno;
        free(p->tmp_path);
        p->tmp_path = NULL;
        send_error(id, e, path);
        drop_session(s);
    }
}

static void put_data(struct session *s, const uint8_t *data, size_t n)
{
    struct put_state *p = &s->u.put;
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(p->fd, data + done, n - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            send_error(s->id, w < 0 ? errno : ENOSPC, p->path);
            drop_session(s);
            return;
        }
        done += (size_t)w;
    }
    p->written += n;
    send_window(s->id, (uint32_t)n);
}

static void put_end(struct session *s)
{
    struct put_state *p = &s->u.put;
    int err = 0;
    if (fchmod(p->fd, p->mode) < 0)
        err = errno;
    if (!err && (p->uid >= 0 || p->gid >= 0) && fchown(p->fd, p->uid, p->gid) < 0)
        err = errno;
    if (!err && fchmod(p->fd, p->mode) < 0) /* chown clears setuid bits */
        err = errno;
    if (!err && p->has_mtime) {
        struct timespec ts[2];
        ns_to_timespec(p->mtime_ns, &ts[1]);
        ts[0] = ts[1];
        if (futimens(p->fd, ts) < 0)
            err = errno;
    }
    if (!err && close(p->fd) < 0)
        err = errno;
    p->fd = -1;
    if (!err && rename(p->tmp_path, p->path) < 0)
        err = errno;
    if (err) {
        send_error(s->id, err, p->path);
        drop_session(s);
        return;
    }
    free(p->tmp_path);
    p->tmp_path = NULL; /* renamed: nothing to unlink */
    uint8_t b[8];
    put_be64(b, p->written);
    send_frame(s->id, AP_PUT_DONE, b, 8);
    drop_session(s);
}

static void handle_mkdir(uint32_t id, struct rd *r)
{
    uint32_t mode = rd_u32(r) & 07777;
    int32_t uid = (int32_t)rd_u32(r), gid = (int32_t)rd_u32(r);
    uint8_t flags = rd_u8(r);
    int64_t mtime = (int64_t)rd_u64(r);
    char *path = rd_str(r);
    if (r->bad || path[0] != '/') {
        send_error(id, EINVAL, "mkdir: need an absolute path");
        return;
    }
    if (flags & AP_MKDIR_PARENTS)
        mkdir_parents(path, 0755);
    struct stat st;
    if (mkdir(path, mode) < 0 && !(errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))) {
        send_error(id, errno, path);
        return;
    }
    if (chmod(path, mode) < 0 || ((uid >= 0 || gid >= 0) && chown(path, uid, gid) < 0)) {
        send_error(id, errno, path);
        return;
    }
    if (flags & AP_MKDIR_HAS_MTIME) {
        struct timespec ts[2];
        ns_to_timespec(mtime, &ts[1]);
        ts[0] = ts[1];
        if (utimensat(AT_FDCWD, path, ts, 0) < 0) {
            send_error(id, errno, path);
            return;
        }
    }
    send_empty(id, AP_OK);
}

static void handle_symlink(uint32_t id, struct rd *r)
{
    int32_t uid = (int32_t)rd_u32(r), gid = (int32_t)rd_u32(r);
    uint8_t flags = rd_u8(r);
    char *target = rd_str(r);
    char *path = rd_str(r);
    if (r->bad || path[0] != '/') {
        send_error(id, EINVAL, "symlink: need an absolute path");
        return;
    }
    mkdir_parents(path, 0755);
    if (flags & AP_SYMLINK_REPLACE) {
        struct stat st;
        if (lstat(path, &st) == 0 && !S_ISDIR(st.st_mode))
            unlink(path);
    }
    if (symlink(target, path) < 0 || ((uid >= 0 || gid >= 0) && lchown(path, uid, gid) < 0)) {
        send_error(id, errno, path);
        return;
    }
    send_empty(id, AP_OK);
}

static uint8_t type_of(mode_t m)
{
    if (S_ISREG(m))
        return AP_T_FILE;
    if (S_ISDIR(m))
        return AP_T_DIR;
    if (S_ISLNK(m))
        return AP_T_SYMLINK;
    return AP_T_OTHER;
}

static void wr_stat(struct wr *w, const struct stat *st)
{
    wr_u8(w, type_of(st->st_mode));
    wr_u32(w, st->st_mode & 07777);
    wr_u64(w, S_ISDIR(st->st_mode) ? 0 : (uint64_t)st->st_size);
    wr_u64(w, (uint64_t)stat_mtime_ns(st));
    wr_u32(w, st->st_uid);
    wr_u32(w, st->st_gid);
}

static void read_link(int dirfd, const char *name, char *target, size_t cap)
{
    ssize_t n = readlinkat(dirfd, name, target, cap - 1);
    target[n < 0 ? 0 : n] = 0;
}

static void handle_stat(uint32_t id, struct rd *r)
{
    uint8_t flags = rd_u8(r);
    char *path = rd_str(r);
    if (r->bad) {
        send_error(id, EINVAL, "malformed stat request");
        return;
    }
    struct stat st;
    int rc = (flags & AP_FOLLOW_LINKS) ? stat(path, &st) : lstat(path, &st);
    struct wr w = wr_begin();
    static char target[PATH_MAX];
    target[0] = 0;
    char error[512] = "";
    if (rc < 0) {
        if (errno != ENOENT && errno != ENOTDIR)
            snprintf(error, sizeof(error), "%s: %s", path, strerror(errno));
        memset(&st, 0, sizeof(st));
        wr_u8(&w, 0);
    } else {
        wr_u8(&w, 1);
        if (S_ISLNK(st.st_mode))
            read_link(AT_FDCWD, path, target, sizeof(target));
    }
    wr_stat(&w, &st);
    if (rc < 0)
        w.p[1] = AP_T_OTHER; /* type of a missing path is meaningless */
    wr_str(&w, target);
    wr_str(&w, error);
    send_wr(id, AP_STAT_RESULT, &w);
}

static void handle_set_clock(uint32_t id, struct rd *r)
{
    int64_t ns = (int64_t)rd_u64(r);
    if (r->bad) {
        send_error(id, EINVAL, "malformed set_clock request");
        return;
    }
    struct timespec ts;
    ns_to_timespec(ns, &ts);
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
        send_error(id, errno, "clock_settime");
        return;
    }
    send_empty(id, AP_OK);
}

/* ---------- identity (after a fork from a snapshot) ---------- */

/* <linux/random.h> is not among musl's headers: the two ioctls and their argument, as the kernel
 * defines them. */
#ifndef RNDADDENTROPY
#define RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG 0x5207 /* _IO('R', 0x07) */
#endif
struct entropy_arg { /* struct rand_pool_info with room for the data */
    int entropy_count;  /* bits credited */
    int buf_size;       /* bytes */
    uint8_t buf[AP_IDENTITY_MAX_ENTROPY];
};

/* Mix the host's bytes into the input pool, credited in full, and reseed the CRNG now rather than
 * at its next scheduled reseed, so that every reader from here on gets output no sibling fork can
 * share. Needs CAP_SYS_ADMIN. init moved the kernel's devtmpfs (not the image's /dev, which it
 * covers) into the new root before the switch, so /dev/urandom here is the kernel's node. */
static int add_entropy(const uint8_t *data, size_t len, const char **what)
{
    *what = "open /dev/urandom";
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        fd = open("/dev/random", O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return -1;
    static struct entropy_arg arg;
    arg.entropy_count = (int)(len * 8);
    arg.buf_size = (int)len;
    memcpy(arg.buf, data, len);
    int rc = -1;
    *what = "RNDADDENTROPY";
    if (ioctl(fd, RNDADDENTROPY, &arg) == 0) {
        *what = "RNDRESEEDCRNG";
        rc = ioctl(fd, RNDRESEEDCRNG) == 0 ? 0 : -1;
    }
    int saved = errno;
    memset(&arg, 0, sizeof(arg));
    close(fd);
    errno = saved;
    return rc;
}

/* Host byte order: the checks of a new address. */
static int is_host_address(uint32_t ip)
{
    uint32_t first = ip >> 24;
    /* 0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4 reserved and broadcast */
    return first != 0 && first != 127 && first < 224;
}

/* Why ip/prefix with gateway (0: none), all host byte order, cannot be an interface's address,
 * written to msg; 0 if it can. */
static int check_network(uint32_t ip, unsigned prefix, uint32_t gateway, char *msg, size_t len)
{
    struct in_addr ip_be = {htonl(ip)}, gateway_be = {htonl(gateway)};
    char ip_text[INET_ADDRSTRLEN], gateway_text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &ip_be, ip_text, sizeof(ip_text));
    inet_ntop(AF_INET, &gateway_be, gateway_text, sizeof(gateway_text));
    if (prefix < 1 || prefix > 32) {
        snprintf(msg, len, "identity: prefix /%u (1 to 32)", prefix);
        return -1;
    }
    uint32_t mask = 0xFFFFFFFFu << (32 - prefix);
    /* Below /31 the first and last address of a subnet are its network and broadcast address. */
    int edges = prefix <= 30;
    if (!is_host_address(ip) || (edges && ((ip & ~mask) == 0 || (ip & ~mask) == ~mask))) {
        snprintf(msg, len, "identity: %s/%u is not a host address", ip_text, prefix);
        return -1;
    }
    if (gateway == 0)
        return 0;
    if (gateway == ip || (gateway & mask) != (ip & mask) || !is_host_address(gateway) ||
        (edges && ((gateway & ~mask) == 0 || (gateway & ~mask) == ~mask))) {
        snprintf(msg, len, "identity: gateway %s is not another host of %s/%u", gateway_text, ip_text, prefix);
        return -1;
    }
    return 0;
}

/* Everything is checked before anything changes; then entropy, hostname, MAC, network in that
 * order. An ERROR names the step that failed (the earlier ones stay done). OK carries one byte,
 * AP_IDENTITY_DONE_NETWORK set when the network was replaced: an agent older than the network
 * part answers an empty OK (having ignored it), which the host can tell from this. */
static void handle_identity(uint32_t id, struct rd *r)
{
    uint16_t entropy_len = rd_u16(r);
    const uint8_t *entropy = rd_take(r, entropy_len);
    uint8_t mac_len = rd_u8(r);
    const uint8_t *mac = rd_take(r, mac_len);
    char *hostname = rd_str(r);
    /* The network part is optional: a request that ends after the hostname keeps the address. */
    uint8_t net_len = r->pos < r->n ? rd_u8(r) : 0;
    const uint8_t *net = rd_take(r, net_len);
    if (r->bad) {
        send_error(id, EINVAL, "malformed identity request");
        return;
    }
    char msg[160];
    if (entropy_len > AP_IDENTITY_MAX_ENTROPY) {
        snprintf(msg, sizeof(msg), "identity: %u bytes of entropy (at most %d)", entropy_len,
                 AP_IDENTITY_MAX_ENTROPY);
        send_error_text(id, EINVAL, msg);
        return;
    }
    if (mac_len != 0 && mac_len != AP_IDENTITY_MAC_LEN) {
        send_error_text(id, EINVAL, "identity: a MAC address has 6 bytes");
        return;
    }
    if (mac_len && ((mac[0] & 1) || !(mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]))) {
        snprintf(msg, sizeof(msg), "identity: %02x:%02x:%02x:%02x:%02x:%02x is not a unicast address", mac[0],
                 mac[1], mac[2], mac[3], mac[4], mac[5]);
        send_error_text(id, EINVAL, msg);
        return;
    }
    size_t name_len = strlen(hostname);
    if (name_len > AP_IDENTITY_MAX_HOSTNAME) {
        snprintf(msg, sizeof(msg), "identity: hostname of %zu bytes (at most %d)", name_len,
                 AP_IDENTITY_MAX_HOSTNAME);
        send_error_text(id, EINVAL, msg);
        return;
    }
    if (net_len != 0 && net_len != AP_IDENTITY_NET_LEN) {
        snprintf(msg, sizeof(msg), "identity: a network has %d bytes, not %u", AP_IDENTITY_NET_LEN, net_len);
        send_error_text(id, EINVAL, msg);
        return;
    }
    uint32_t ip = net_len ? get_be32(net) : 0, gateway = net_len ? get_be32(net + 5) : 0;
    unsigned prefix = net_len ? net[4] : 0;
    if (net_len && check_network(ip, prefix, gateway, msg, sizeof(msg)) != 0) {
        send_error_text(id, EINVAL, msg);
        return;
    }
    if ((mac_len || net_len) && if_nametoindex("eth0") == 0) {
        send_error_text(id, ENODEV, "identity: the VM has no eth0");
        return;
    }
    const char *what;
    if (entropy_len && add_entropy(entropy, entropy_len, &what) != 0) {
        send_error(id, errno, what);
        return;
    }
    if (name_len && sethostname(hostname, name_len) != 0) {
        send_error(id, errno, "sethostname");
        return;
    }
    char err[256];
    /* With a new address to follow, the old one is not announced with the new MAC, and its routes
     * are not kept: the network step replaces them. */
    if (mac_len && netconf_set_mac("eth0", mac, net_len != 0, err, sizeof(err)) != 0) {
        send_error_text(id, errno, err);
        return;
    }
    if (net_len && netconf_readdress("eth0", htonl(ip), (int)prefix, htonl(gateway), err, sizeof(err)) != 0) {
        send_error_text(id, errno, err);
        return;
    }
    uint8_t done = net_len ? AP_IDENTITY_DONE_NETWORK : 0;
    send_frame(id, AP_OK, &done, 1);
}

/* ---------- get (copy from guest) ---------- */

static void send_entry(uint32_t id, const char *rel, const struct stat *st, const char *link)
{
    struct wr w = wr_begin();
    wr_stat(&w, st);
    wr_str(&w, rel);
    wr_str(&w, link);
    send_wr(id, AP_ENTRY, &w);
}

static void send_entry_error(uint32_t id, const char *rel, int err)
{
    struct wr w = wr_begin();
    wr_str(&w, rel);
    wr_str(&w, strerror(err));
    send_wr(id, AP_ENTRY_ERROR, &w);
}

static void send_entry_error_text(uint32_t id, const char *rel, const char *message)
{
    struct wr w = wr_begin();
    wr_str(&w, rel);
    wr_str(&w, message);
    send_wr(id, AP_ENTRY_ERROR, &w);
}

static void handle_get(uint32_t id, struct rd *r)
{
    uint8_t flags = rd_u8(r);
    char *path = rd_str(r);
    if (r->bad || !path[0]) {
        send_error(id, EINVAL, "malformed get request");
        return;
    }
    struct stat st;
    if (((flags & AP_FOLLOW_LINKS) ? stat(path, &st) : lstat(path, &st)) < 0) {
        send_error(id, errno, path);
        return;
    }
    struct session *s = new_session(id, S_GET);
    if (!s)
        return;
    struct get_state *g = calloc(1, sizeof(*g));
    if (!g || !(g->path = strdup(path))) {
        free(g);
        send_error(id, ENOMEM, "get");
        s->kind = S_FREE;
        return;
    }
    s->u.get = g;
    g->file_fd = -1;
    g->follow = flags & AP_FOLLOW_LINKS;
    g->recursive = flags & AP_GET_RECURSIVE;
    /* Relative names start at the base name of the requested path ("." for "/"). */
    size_t len = strlen(g->path);
    while (len > 1 && g->path[len - 1] == '/')
        g->path[--len] = 0;
    const char *base = strrchr(g->path, '/');
    base = base ? base + 1 : g->path;
    snprintf(g->rel, sizeof(g->rel), "%s", base[0] ? base : ".");
}

/* Emit the entry for `name` inside the directory on top of the stack (or the root when dirfd is
 * AT_FDCWD and name is the full path). */
static void get_visit(struct session *s, int dirfd, const char *name, int follow)
{
    struct get_state *g = s->u.get;
    struct stat st;
    if (fstatat(dirfd, name, &st, follow ? 0 : AT_SYMLINK_NOFOLLOW) < 0) {
        send_entry_error(s->id, g->rel, errno);
        return;
    }
    static char link[PATH_MAX];
    link[0] = 0;
    if (S_ISREG(st.st_mode)) {
        /* O_NONBLOCK: the path may have become a FIFO since the stat (open would wait for a
         * writer), and some "regular" files block on read when empty (/proc/kmsg). */
        int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (follow ? 0 : O_NOFOLLOW));
        if (fd < 0) {
            send_entry_error(s->id, g->rel, errno);
            return;
        }
        send_entry(s->id, g->rel, &st, link);
        g->file_fd = fd; /* data follows, then ENTRY_END */
        g->idle_since = 0;
        return;
    }
    if (S_ISLNK(st.st_mode))
        read_link(dirfd, name, link, sizeof(link));
    send_entry(s->id, g->rel, &st, link);
    send_empty(s->id, AP_ENTRY_END);
    if (S_ISDIR(st.st_mode) && g->recursive) {
        if (g->depth >= GET_MAX_DEPTH) {
            send_entry_error(s->id, g->rel, ELOOP);
            return;
        }
        int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
        DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
        if (!d) {
            send_entry_error(s->id, g->rel, errno);
            if (fd >= 0)
                close(fd);
            return;
        }
        g->stack[g->depth] = d;
        g->rel_len[g->depth] = strlen(g->rel);
        g->depth++;
    }
}

/* A file gave EAGAIN (it is open O_NONBLOCK). Hand the loop what is queued, then wait for data up
 * to GET_IDLE_READ_MS since the file last gave some. Returns 0 once that time is up. Only ever
 * runs in a worker: the wait blocks nobody else. */
static int get_wait_for_data(struct session *s)
{
    struct get_state *g = s->u.get;
    int64_t now = now_ms();
    if (!g->idle_since)
        g->idle_since = now;
    else
        /* poll said readable but read still found nothing (a file without poll support): do
         * not spin */
        nanosleep(&(struct timespec){0, 20 * 1000000}, NULL);
    if (worker_flush() < 0)
        return 0;
    int64_t left = g->idle_since + GET_IDLE_READ_MS - now_ms();
    if (left <= 0)
        return 0;
    struct pollfd pfd = {g->file_fd, POLLIN, 0};
    int rc;
    do
        rc = poll(&pfd, 1, (int)left);
    while (rc < 0 && errno == EINTR);
    return rc > 0;
}

/* Advance a get session by a bounded amount of work. Returns 1 if it may progress further now. */
static int get_step(struct session *s)
{
    struct get_state *g = s->u.get;
    for (int steps = 0; steps < 64; steps++) {
        if (!connected || out.len >= OUT_PRODUCE_LIMIT)
            return 0;
        if (g->file_fd >= 0) {
            if (s->credit == 0)
                return 0;
            ssize_t n = produce_from_fd(s, g->file_fd, AP_FILE_DATA);
            if (n > 0) {
                g->idle_since = 0;
                continue;
            }
            if (n == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                if (get_wait_for_data(s))
                    continue;
                char msg[128];
                snprintf(msg, sizeof(msg), "no data for %d s: a file that never ends (a FIFO, /proc/kmsg?) "
                         "cannot be copied", GET_IDLE_READ_MS / 1000);
                send_entry_error_text(s->id, g->rel, msg);
            } else if (n < 0) {
                send_entry_error(s->id, g->rel, errno);
            }
            close_fd(&g->file_fd);
            send_empty(s->id, AP_ENTRY_END);
            continue;
        }
        if (!g->started) {
            g->started = 1;
            get_visit(s, AT_FDCWD, g->path, g->follow);
            continue;
        }
        if (g->depth == 0) {
            send_empty(s->id, AP_GET_DONE);
            drop_session(s);
            return 0;
        }
        DIR *d = g->stack[g->depth - 1];
        size_t base_len = g->rel_len[g->depth - 1];
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) {
                g->rel[base_len] = 0;
                send_entry_error(s->id, g->rel, errno);
            }
            closedir(d);
            g->depth--;
            continue;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (base_len + 1 + strlen(de->d_name) >= sizeof(g->rel)) {
            g->rel[base_len] = 0;
            send_entry_error(s->id, g->rel, ENAMETOOLONG);
            continue;
        }
        g->rel[base_len] = '/';
        strcpy(g->rel + base_len + 1, de->d_name);
        get_visit(s, dirfd(d), de->d_name, 0);
    }
    return 1;
}

/* ---------- workers: file requests outside the loop ---------- */

static void handle_file_request(uint32_t id, uint8_t type, struct rd *r)
{
    switch (type) {
    case AP_PUT:
        handle_put(id, r);
        break;
    case AP_MKDIR:
        handle_mkdir(id, r);
        break;
    case AP_SYMLINK:
        handle_symlink(id, r);
        break;
    case AP_GET:
        handle_get(id, r);
        break;
    default:
        handle_stat(id, r);
        break;
    }
}

static void handle_frame(uint32_t id, uint8_t type, uint8_t *payload, size_t len);
static void parse_input(void);

/* The worker process: serve the one request, writing frames to the loop through `to_loop` (and,
 * for PUT, reading the host's FILE_DATA / FILE_END the loop relays through `from_loop`), then exit.
 * The loop's own fds are closed first, never used: a worker that outlives the agent (stuck on a
 * hung mount) must not keep the virtio port open (it admits one opener) or a child's terminal. */
static void worker_run(uint32_t id, uint8_t type, uint8_t *payload, size_t len, int to_loop, int from_loop)
{
    in_worker = 1;
    for (int i = 0; i < MAX_SESSIONS; i++) {
        struct session *o = &sessions[i];
        if (o->kind == S_EXEC) {
            exec_close_fds(&o->u.x);
            close_fd(&o->u.x.status_fd);
        } else if (o->kind == S_WORK) {
            close_fd(&o->u.w.from_fd);
            close_fd(&o->u.w.to_fd);
        }
        o->kind = S_FREE;
    }
    close_fd(&port_fd);
    close_fd(&sigchld_pipe[0]);
    close_fd(&sigchld_pipe[1]);
    signal(SIGCHLD, SIG_DFL);
    port_fd = to_loop;
    connected = 1;
    hunting = 0;
    out.off = out.len = 0;
    /* payload points into this process's copy of `in`, intact until `in` is reused below */
    handle_frame(id, type, payload, len);
    in.off = in.len = 0;
    for (;;) {
        if (worker_flush() < 0)
            break;
        struct session *s = find_session(id);
        if (!s)
            break; /* the terminal frame is out */
        if (s->kind == S_GET) {
            s->credit = UINT32_MAX; /* the loop applies the host's window */
            get_step(s);
            continue;
        }
        if (from_loop < 0 || buf_reserve(&in, READ_CHUNK) < 0)
            break;
        ssize_t n = read(from_loop, in.p + in.off + in.len, READ_CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* the loop dropped the session (CANCEL, HELLO): abandon the file */
        in.len += (size_t)n;
        parse_input();
    }
    drop_all_sessions(); /* an unfinished PUT deletes its temporary file */
    _exit(0);
}

static void start_worker(uint32_t id, uint8_t type, uint8_t *payload, size_t len)
{
    struct session *s = new_session(id, S_WORK);
    if (!s)
        return;
    struct work_state *w = &s->u.w;
    w->from_fd = w->to_fd = -1;
    w->is_put = type == AP_PUT;
    int from[2] = {-1, -1}, to[2] = {-1, -1};
    if (pipe2(from, O_CLOEXEC) < 0 || (w->is_put && pipe2(to, O_CLOEXEC) < 0)) {
        int e = errno;
        for (int i = 0; i < 2; i++) {
            close_fd(&from[i]);
            close_fd(&to[i]);
        }
        send_error(id, e, "pipe");
        drop_session(s);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close_fd(&from[0]);
        close_fd(&to[1]);
        worker_run(id, type, payload, len, from[1], to[0]);
    }
    int fork_err = errno;
    close_fd(&from[1]);
    close_fd(&to[0]);
    w->from_fd = from[0];
    w->to_fd = to[1];
    if (pid < 0) {
        send_error(id, fork_err, "fork");
        drop_session(s);
        return;
    }
    w->pid = pid;
    int fds[2] = {w->from_fd, w->to_fd};
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0 && fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK) < 0) {
            send_error(id, errno, "fcntl");
            drop_session(s);
            return;
        }
}

/* Relay the worker's complete frames to the host while the outbound buffer has room, data frames
 * only within the session's credit. The terminal frame ends the session. */
static void work_forward(struct session *s)
{
    struct work_state *w = &s->u.w;
    while (connected && out.len < OUT_PRODUCE_LIMIT && w->from_q.len >= AP_HEADER_LEN) {
        const uint8_t *f = w->from_q.p + w->from_q.off;
        uint32_t len = get_be32(f);
        uint8_t type = f[8];
        if (len > AP_MAX_PAYLOAD) {
            send_error(s->id, EIO, "file worker sent a malformed frame");
            drop_session(s);
            return;
        }
        if (w->from_q.len < AP_HEADER_LEN + len)
            break;
        if (type == AP_FILE_DATA) {
            if (len > s->credit)
                break;
            s->credit -= len;
        }
        send_frame(s->id, type, f + AP_HEADER_LEN, len);
        buf_consume(&w->from_q, AP_HEADER_LEN + len);
        if (is_terminal(type)) {
            drop_session(s);
            return;
        }
    }
    if (w->from_fd < 0 && (w->from_q.len < AP_HEADER_LEN ||
                           w->from_q.len < AP_HEADER_LEN + get_be32(w->from_q.p + w->from_q.off))) {
        /* killed (OOM?) or crashed before its answer: the host must not wait for one */
        send_error(s->id, EIO, "file worker ended without an answer");
        drop_session(s);
    }
}

static void work_read(struct session *s)
{
    struct work_state *w = &s->u.w;
    while (w->from_fd >= 0 && w->from_q.len < WORK_FROM_LIMIT) {
        size_t room = WORK_FROM_LIMIT - w->from_q.len;
        if (buf_reserve(&w->from_q, room) < 0)
            break;
        ssize_t n = read(w->from_fd, w->from_q.p + w->from_q.off + w->from_q.len, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0) {
            close_fd(&w->from_fd);
            break;
        }
        w->from_q.len += (size_t)n;
    }
    work_forward(s);
}

static void work_flush_to(struct session *s)
{
    struct work_state *w = &s->u.w;
    while (w->to_fd >= 0 && w->to_q.len) {
        ssize_t n = write(w->to_fd, w->to_q.p + w->to_q.off, w->to_q.len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) { /* the worker is gone; its closed pipe ends the session */
            close_fd(&w->to_fd);
            buf_consume(&w->to_q, w->to_q.len);
            return;
        }
        buf_consume(&w->to_q, (size_t)n);
    }
}

/* A host frame for a PUT worker, queued in order. The host's window bounds the queue. */
static void work_to_worker(struct session *s, uint8_t type, const uint8_t *payload, size_t len)
{
    struct work_state *w = &s->u.w;
    if (w->to_fd < 0)
        return;
    if (w->to_q.len + AP_HEADER_LEN + len > WORK_TO_LIMIT) {
        send_error(s->id, ENOBUFS, "put: the host sent more than its window");
        drop_session(s);
        return;
    }
    if (buf_reserve(&w->to_q, AP_HEADER_LEN + len) < 0) {
        send_error(s->id, ENOMEM, "put");
        drop_session(s);
        return;
    }
    uint8_t *h = w->to_q.p + w->to_q.off + w->to_q.len;
    put_be32(h, (uint32_t)len);
    put_be32(h + 4, s->id);
    h[8] = type;
    if (len)
        memcpy(h + AP_HEADER_LEN, payload, len);
    w->to_q.len += AP_HEADER_LEN + len;
    work_flush_to(s);
}

/* ---------- inbound frames ---------- */

static void send_hello_ack(uint64_t nonce)
{
    struct wr w = wr_begin();
    uint8_t *m = wr_take(&w, AP_MAGIC_LEN);
    memcpy(m, AP_MAGIC, AP_MAGIC_LEN);
    wr_u32(&w, AP_VERSION);
    wr_u64(&w, nonce);
    wr_u32(&w, AP_MAX_PAYLOAD);
    wr_u32(&w, AP_INITIAL_WINDOW);
    send_wr(0, AP_HELLO_ACK, &w);
}

static void handle_hello(struct rd *r)
{
    const uint8_t *magic = rd_take(r, AP_MAGIC_LEN);
    uint32_t version = rd_u32(r);
    uint64_t nonce = rd_u64(r);
    if (r->bad || memcmp(magic, AP_MAGIC, AP_MAGIC_LEN) != 0)
        return;
    (void)version; /* the reply carries ours; the host decides whether it can talk to it */
    /* A new host connection: whatever the old one started is orphaned. */
    drop_all_sessions();
    out.len = out.off = 0;
    send_hello_ack(nonce);
}

static void handle_frame(uint32_t id, uint8_t type, uint8_t *payload, size_t len)
{
    struct rd r = {payload, len, 0, 0};
    struct session *s = NULL;
    switch (type) {
    case AP_PAD:
        return;
    case AP_HELLO:
        handle_hello(&r);
        return;
    case AP_PING: {
        uint8_t *tok = (uint8_t *)rd_take(&r, 8);
        if (tok)
            send_frame(id, AP_PONG, tok, 8);
        return;
    }
    case AP_EXEC:
        handle_exec(id, &r);
        return;
    case AP_PUT:
    case AP_MKDIR:
    case AP_SYMLINK:
    case AP_GET:
    case AP_STAT:
        if (in_worker)
            handle_file_request(id, type, &r);
        else
            start_worker(id, type, payload, len);
        return;
    case AP_SET_CLOCK:
        handle_set_clock(id, &r);
        return;
    case AP_IDENTITY:
        handle_identity(id, &r);
        return;
    default:
        break;
    }
    /* The rest address a running session; frames for a finished one are late, not wrong. */
    s = find_session(id);
    switch (type) {
    case AP_STDIN:
        if (s && s->kind == S_EXEC)
            exec_stdin(s, payload, len);
        return;
    case AP_STDIN_EOF:
        if (s && s->kind == S_EXEC && !s->u.x.stdin_eof) {
            s->u.x.stdin_eof = 1;
            exec_flush_stdin(s);
        }
        return;
    case AP_RESIZE:
        if (s && s->kind == S_EXEC && s->u.x.tty && s->u.x.out_fd >= 0) {
            uint16_t rows = rd_u16(&r), cols = rd_u16(&r);
            struct winsize ws = {.ws_row = rows, .ws_col = cols};
            if (!r.bad)
                ioctl(s->u.x.out_fd, TIOCSWINSZ, &ws);
        }
        return;
    case AP_SIGNAL:
        if (s && s->kind == S_EXEC) {
            uint8_t sig = rd_u8(&r);
            if (!r.bad && sig > 0 && sig < 65)
                exec_signal(&s->u.x, sig);
        }
        return;
    case AP_FILE_DATA:
        if (s && s->kind == S_PUT)
            put_data(s, payload, len);
        else if (s && s->kind == S_WORK && s->u.w.is_put)
            work_to_worker(s, type, payload, len);
        return;
    case AP_FILE_END:
        if (s && s->kind == S_PUT)
            put_end(s);
        else if (s && s->kind == S_WORK && s->u.w.is_put)
            work_to_worker(s, type, payload, len);
        return;
    case AP_WINDOW:
        if (s) {
            uint32_t inc = rd_u32(&r);
            if (!r.bad)
                s->credit = (uint64_t)s->credit + inc > UINT32_MAX ? UINT32_MAX : s->credit + inc;
        }
        return;
    case AP_CANCEL:
        if (s)
            drop_session(s);
        return;
    default:
        send_error(id, ENOSYS, "unknown request type");
        return;
    }
}

static const uint8_t *hello_prefix(void)
{
    static uint8_t pre[AP_HEADER_LEN + AP_MAGIC_LEN];
    put_be32(pre, AP_MAGIC_LEN + 4 + 8);
    put_be32(pre + 4, 0);
    pre[8] = AP_HELLO;
    memcpy(pre + AP_HEADER_LEN, AP_MAGIC, AP_MAGIC_LEN);
    return pre;
}

static void parse_input(void)
{
    const size_t plen = AP_HEADER_LEN + AP_MAGIC_LEN;
    for (;;) {
        uint8_t *p = in.p + in.off;
        if (hunting) {
            /* Out of sync (start, reconnect, garbage): skip to the next HELLO. */
            const uint8_t *pre = hello_prefix();
            size_t i = 0;
            for (; i + plen <= in.len; i++)
                if (p[i] == pre[0] && memcmp(p + i, pre, plen) == 0)
                    break;
            if (i + plen > in.len) {
                size_t keep = in.len < plen - 1 ? in.len : plen - 1;
                buf_consume(&in, in.len - keep);
                return;
            }
            buf_consume(&in, i);
            hunting = 0;
            continue;
        }
        if (in.len < AP_HEADER_LEN)
            return;
        uint32_t len = get_be32(p);
        if (len > AP_MAX_PAYLOAD) {
            hunting = 1;
            buf_consume(&in, 1);
            continue;
        }
        if (in.len < AP_HEADER_LEN + len)
            return;
        handle_frame(get_be32(p + 4), p[8], p + AP_HEADER_LEN, len);
        buf_consume(&in, AP_HEADER_LEN + len);
    }
}

/* ---------- port I/O ---------- */

static void host_gone(void)
{
    /* virtio-serial: no host on the chardev. Reads give EOF and poll reports POLLHUP until one
     * connects; the host will send HELLO, so resynchronise on it then. Sessions stay until then. */
    connected = 0;
    hunting = 1;
    in.len = in.off = 0;
    out.len = out.off = 0;
    reconnect_check_at = now_ms() + RECONNECT_CHECK_MS;
}

static int read_port(void)
{
    for (;;) {
        if (buf_reserve(&in, READ_CHUNK) < 0)
            return 0;
        ssize_t n = read(port_fd, in.p + in.off + in.len, READ_CHUNK);
        if (n > 0) {
            in.len += (size_t)n;
            parse_input();
            if (out.len >= OUT_HARD_LIMIT)
                return 0;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (port_is_stream)
            return -1; /* a socket/FIFO peer that closed is gone for good */
        host_gone();
        return 0;
    }
}

static void write_port(void)
{
    while (connected && out.len) {
        ssize_t n = write(port_fd, out.p + out.off, out.len);
        if (n > 0) {
            buf_consume(&out, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        host_gone();
        return;
    }
}

static void on_sigchld(int sig)
{
    (void)sig;
    int saved = errno;
    ssize_t r = write(sigchld_pipe[1], "c", 1);
    (void)r;
    errno = saved;
}

static void make_raw(int fd)
{
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        tcsetattr(fd, TCSANOW, &t);
    }
}

/* ---------- main loop ---------- */

enum role { R_PORT, R_SIGNAL, R_IN, R_OUT, R_ERR, R_STATUS, R_WORK_FROM, R_WORK_TO };

int agent_serve(int fd)
{
    port_fd = fd;
    /* Children get 0-2 by dup2 from our pipes; an fd number below 3 would be clobbered. */
    for (int std = 0; std < 3; std++)
        if (fcntl(std, F_GETFD) < 0)
            open("/dev/null", O_RDWR);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (isatty(fd))
        make_raw(fd); /* a pty in host-mode tests, or a hvc console */
    struct stat st;
    port_is_stream = fstat(fd, &st) == 0 && (S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode));
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    if (buf_reserve(&in, 2 * (AP_HEADER_LEN + AP_MAX_PAYLOAD)) < 0)
        return -1;
    /* A host still connected to an agent that died must learn that its sessions are gone (it
     * would wait for them forever) and that this agent needs a HELLO. With no host connected the
     * notice is dropped like any other output. */
    send_hello_ack(AP_AGENT_STARTED_NONCE);

    enum { MAX_POLLED = 2 + 4 * MAX_SESSIONS };
    static struct pollfd pfd[MAX_POLLED];
    static short role[MAX_POLLED];
    static struct session *owner[MAX_POLLED];
    static uint32_t owner_id[MAX_POLLED]; /* a slot freed and reused within one turn is not ours */
    for (;;) {
        int64_t now = now_ms();
        int timeout = -1;
        /* timers and fd-less work */
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &sessions[i];
            if (s->kind == S_EXEC) {
                struct exec_state *x = &s->u.x;
                if (!x->exited && x->deadline && now >= x->deadline) {
                    x->timed_out = 1;
                    exec_signal(x, SIGKILL);
                    x->deadline = 0;
                }
                if (x->started && x->exited && exec_output_open(x)) {
                    if (!can_produce(s))
                        x->drain_until = now + EXIT_DRAIN_MS; /* blocked on the host, not idle */
                    else if (now >= x->drain_until) {
                        exec_close_fds(x);
                    }
                }
                exec_finish_if_done(s);
                if (s->kind != S_EXEC)
                    continue;
                int64_t next = 0;
                if (!x->exited && x->deadline)
                    next = x->deadline;
                else if (x->started && x->exited && can_produce(s))
                    next = x->drain_until;
                if (next) {
                    int64_t d = next - now;
                    d = d < 0 ? 0 : d;
                    if (timeout < 0 || d < timeout)
                        timeout = (int)d;
                }
            } else if (s->kind == S_WORK) {
                work_forward(s); /* credit or room may have come since */
            }
        }
        write_port();
        if (!connected) {
            int64_t d = reconnect_check_at - now;
            d = d < 0 ? 0 : d;
            if (timeout < 0 || d < timeout)
                timeout = (int)d;
        }

        int n = 0;
        if (connected) {
            pfd[n] = (struct pollfd){fd, 0, 0};
            if (out.len < OUT_HARD_LIMIT)
                pfd[n].events |= POLLIN;
            if (out.len)
                pfd[n].events |= POLLOUT;
            role[n] = R_PORT;
            owner[n++] = NULL;
        }
        pfd[n] = (struct pollfd){sigchld_pipe[0], POLLIN, 0};
        role[n] = R_SIGNAL;
        owner[n++] = NULL;
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &sessions[i];
            if (s->kind == S_WORK) {
                struct work_state *w = &s->u.w;
                if (w->from_fd >= 0 && w->from_q.len < WORK_FROM_LIMIT) {
                    pfd[n] = (struct pollfd){w->from_fd, POLLIN, 0};
                    role[n] = R_WORK_FROM;
                    owner_id[n] = s->id;
                    owner[n++] = s;
                }
                if (w->to_fd >= 0 && w->to_q.len) {
                    pfd[n] = (struct pollfd){w->to_fd, POLLOUT, 0};
                    role[n] = R_WORK_TO;
                    owner_id[n] = s->id;
                    owner[n++] = s;
                }
                continue;
            }
            if (s->kind != S_EXEC)
                continue;
            struct exec_state *x = &s->u.x;
            if (x->status_fd >= 0) {
                pfd[n] = (struct pollfd){x->status_fd, POLLIN, 0};
                role[n] = R_STATUS;
                owner_id[n] = s->id;
                owner[n++] = s;
                continue; /* no output, and no STDOUT, before STARTED */
            }
            int produce = can_produce(s);
            if (x->tty) {
                if (x->out_fd < 0 || x->pty_eof)
                    continue;
                short ev = (short)((produce ? POLLIN : 0) | (x->stdin_q.len ? POLLOUT : 0));
                pfd[n] = (struct pollfd){ev ? x->out_fd : -1, ev, 0};
                role[n] = R_OUT;
                owner_id[n] = s->id;
                owner[n++] = s;
                continue;
            }
            if (x->in_fd >= 0 && x->stdin_q.len) {
                pfd[n] = (struct pollfd){x->in_fd, POLLOUT, 0};
                role[n] = R_IN;
                owner_id[n] = s->id;
                owner[n++] = s;
            }
            if (x->out_fd >= 0 && produce) {
                pfd[n] = (struct pollfd){x->out_fd, POLLIN, 0};
                role[n] = R_OUT;
                owner_id[n] = s->id;
                owner[n++] = s;
            }
            if (x->err_fd >= 0 && produce) {
                pfd[n] = (struct pollfd){x->err_fd, POLLIN, 0};
                role[n] = R_ERR;
                owner_id[n] = s->id;
                owner[n++] = s;
            }
        }
        int rc = poll(pfd, (nfds_t)n, timeout);
        if (rc < 0 && errno != EINTR)
            return -1;

        if (!connected && now_ms() >= reconnect_check_at) {
            struct pollfd probe = {fd, POLLIN, 0};
            if (poll(&probe, 1, 0) >= 0 && ((probe.revents & POLLIN) || !(probe.revents & POLLHUP)))
                connected = 1;
            else
                reconnect_check_at = now_ms() + RECONNECT_CHECK_MS;
        }
        for (int i = 0; rc > 0 && i < n; i++) {
            short re = pfd[i].revents;
            if (!re)
                continue;
            struct session *s = owner[i];
            if (role[i] == R_PORT) {
                if (re & POLLOUT)
                    write_port();
                if (re & (POLLIN | POLLERR)) {
                    if (read_port() < 0)
                        return -1;
                } else if (re & POLLHUP) {
                    if (port_is_stream)
                        return -1;
                    host_gone();
                }
                continue;
            }
            if (role[i] == R_SIGNAL) {
                char drain[64];
                while (read(sigchld_pipe[0], drain, sizeof(drain)) > 0) {
                }
                continue;
            }
            /* sessions may have been dropped (by a HELLO or CANCEL handled above, or an earlier
             * entry of this turn) and their slot even reused */
            if (s->kind == S_FREE || s->id != owner_id[i])
                continue;
            if (s->kind == S_WORK) {
                if (role[i] == R_WORK_TO)
                    work_flush_to(s);
                else if (role[i] == R_WORK_FROM)
                    work_read(s);
                continue;
            }
            struct exec_state *x = &s->u.x;
            if (role[i] == R_STATUS) {
                exec_check_started(s);
                continue;
            }
            if (role[i] == R_IN || (x->tty && (re & POLLOUT)))
                exec_flush_stdin(s);
            if (role[i] == R_OUT && (re & (POLLIN | POLLHUP | POLLERR)))
                exec_pump(s, &x->out_fd, AP_STDOUT);
            if (role[i] == R_ERR && (re & (POLLIN | POLLHUP | POLLERR)))
                exec_pump(s, &x->err_fd, AP_STDERR);
        }
        reap_children();
        write_port();
    }
}
