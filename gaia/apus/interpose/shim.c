/* APUS interposition shim: LD_PRELOAD it into an unmodified server.
 *
 * On the leader every input the server reads from a client connection is agreed by the replica
 * daemon before the server sees it: accept becomes a CONNECT entry, each read that returns data a
 * DATA entry, close a CLOSE entry. The bytes are read into a slot of the shared segment
 * (shim_layout.h), the daemon proposes them, and only once they are committed does the call
 * return them; an input that is not committed (leadership lost, daemon gone) is never delivered,
 * the call fails with ECONNRESET and the server drops that client.
 *
 * On a backup the server's clients are the daemon's replay connections, registered by source
 * port before they connect; any other client is refused, so a backup's state only ever follows
 * the log. For every connection the shim counts the bytes the server read (the replayer waits on
 * it to keep the leader's order of reads across connections) and keeps a running crc32 of what
 * the server wrote (the output checker compares it across replicas).
 *
 * Calls on anything else (files, pipes, listening and outgoing sockets) go straight through.
 * Redis 7 uses accept4/read/write, memcached accept4/read/sendmsg from several threads, so all
 * shared state is touched with atomics. A forked child (Redis BGSAVE) is inert.
 *
 * Environment: GAIA_SHIM_SEGMENT=/name of the segment (shm_open). Without it the shim does
 * nothing; with a segment that does not match this layout the server is stopped at start.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "shim_layout.h"

#define FD_LIMIT 65536
/* Spin only briefly before sleeping on the futex: an agreed input takes hundreds of µs here,
 * and on a 2-core machine a spinning server takes the CPU the replica daemons need. */
#define SPINS 256
#define DAEMON_SILENCE_NS (3LL * 1000 * 1000 * 1000) /* no heartbeat this long: daemon gone */

typedef ssize_t (*read_fn)(int, void *, size_t);
typedef ssize_t (*recv_fn)(int, void *, size_t, int);
typedef ssize_t (*recvfrom_fn)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
typedef ssize_t (*recvmsg_fn)(int, struct msghdr *, int);
typedef ssize_t (*readv_fn)(int, const struct iovec *, int);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*send_fn)(int, const void *, size_t, int);
typedef ssize_t (*sendto_fn)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
typedef ssize_t (*sendmsg_fn)(int, const struct msghdr *, int);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*close_fn)(int);

static read_fn real_read;
static recv_fn real_recv;
static recvfrom_fn real_recvfrom;
static recvmsg_fn real_recvmsg;
static readv_fn real_readv;
static write_fn real_write;
static send_fn real_send;
static sendto_fn real_sendto;
static sendmsg_fn real_sendmsg;
static writev_fn real_writev;
static accept_fn real_accept;
static accept4_fn real_accept4;
static close_fn real_close;

static uint8_t *seg;          /* the mapped segment; NULL: inert */
static int active;            /* attached, and this is the process that attached */
static int daemon_gone;       /* set once the daemon's heartbeat stopped */
static int32_t fdconn[FD_LIMIT]; /* fd -> connection entry + 1 (0: not ours) */
static uint32_t crc_table[256];

/* ------------------------------------------------------------------ segment access */

static inline uint32_t *u32at(uint8_t *base, size_t off) { return (uint32_t *)(base + off); }
static inline uint64_t *u64at(uint8_t *base, size_t off) { return (uint64_t *)(base + off); }
static inline uint8_t *slot_at(int i) { return seg + GAIA_SLOTS_OFFSET + (size_t)i * GAIA_SLOT_SIZE; }
static inline uint8_t *conn_at(int i) { return seg + GAIA_CONNS_OFFSET + (size_t)i * GAIA_CONN_SIZE; }
static inline uint32_t role(void) { return __atomic_load_n(u32at(seg, GAIA_HDR_ROLE), __ATOMIC_ACQUIRE); }
static inline void count(size_t off, uint64_t n) { __atomic_fetch_add(u64at(seg, off), n, __ATOMIC_RELAXED); }

static void say(const char *what) {
    char line[256];
    int n = snprintf(line, sizeof line, "gaia shim [%d]: %s\n", (int)getpid(), what);
    if (n > 0 && real_write) real_write(2, line, (size_t)n);
}

static long futex(uint32_t *word, int op, uint32_t val, const struct timespec *timeout) {
    return syscall(SYS_futex, word, op, val, timeout, NULL, 0);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* zlib's crc32 (reflected 0xEDB88320), so the daemon can check it with zlib.crc32 */
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* ------------------------------------------------------------------ set-up */

static void child_after_fork(void) { active = 0; } /* a forked child never speaks for the server */

__attribute__((constructor)) static void shim_init(void) {
#define RESOLVE(name) real_##name = (name##_fn)dlsym(RTLD_NEXT, #name)
    RESOLVE(read);
    RESOLVE(recv);
    RESOLVE(recvfrom);
    RESOLVE(recvmsg);
    RESOLVE(readv);
    RESOLVE(write);
    RESOLVE(send);
    RESOLVE(sendto);
    RESOLVE(sendmsg);
    RESOLVE(writev);
    RESOLVE(accept);
    RESOLVE(accept4);
    RESOLVE(close);
    crc_init();

    const char *name = getenv("GAIA_SHIM_SEGMENT");
    if (name == NULL || *name == '\0') return;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        say("cannot open the segment named by GAIA_SHIM_SEGMENT: refusing to run unreplicated");
        _exit(70);
    }
    void *m = mmap(NULL, GAIA_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    real_close(fd);
    if (m == MAP_FAILED) {
        say("cannot map the segment: refusing to run unreplicated");
        _exit(70);
    }
    seg = m;
    if (*u64at(seg, GAIA_HDR_MAGIC) != GAIA_MAGIC || *u32at(seg, GAIA_HDR_VERSION) != GAIA_VERSION) {
        say("the segment does not match this shim's layout (rebuild it): refusing to run");
        _exit(70);
    }
    __atomic_store_n(u32at(seg, GAIA_HDR_PID), (uint32_t)getpid(), __ATOMIC_RELEASE);
    pthread_atfork(NULL, NULL, child_after_fork);
    active = 1;
}

/* ------------------------------------------------------------------ agreeing on an input */

static int tracked(int fd) {
    if (!active || fd < 0 || fd >= FD_LIMIT) return -1;
    return __atomic_load_n(&fdconn[fd], __ATOMIC_ACQUIRE) - 1;
}

static uint8_t *claim_slot(void) {
    static __thread unsigned hint;
    for (;;) {
        for (int k = 0; k < GAIA_SLOTS; k++) {
            int i = (int)((hint + (unsigned)k) % GAIA_SLOTS);
            uint32_t expect = GAIA_SLOT_FREE;
            if (__atomic_compare_exchange_n(u32at(slot_at(i), GAIA_SLOT_STATE), &expect,
                                            GAIA_SLOT_CLAIMED, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                hint = (unsigned)i;
                return slot_at(i);
            }
        }
        sched_yield();
    }
}

static void release_slot(uint8_t *slot) {
    __atomic_store_n(u32at(slot, GAIA_SLOT_STATE), GAIA_SLOT_FREE, __ATOMIC_RELEASE);
}

/* Give a slot back after `agree`, unless the daemon still holds it (it stopped answering). */
static void finish(uint8_t *slot) {
    uint32_t s = __atomic_load_n(u32at(slot, GAIA_SLOT_STATE), __ATOMIC_ACQUIRE);
    if (s == GAIA_SLOT_CLAIMED || s == GAIA_SLOT_DONE) release_slot(slot);
}

static size_t slot_capacity(size_t want) {
    size_t cap = __atomic_load_n(u32at(seg, GAIA_HDR_MAX_DATA), __ATOMIC_RELAXED);
    return want < cap ? want : cap;
}

/* Hand a filled slot to the daemon and wait for its verdict: GAIA_RESULT_OK once committed. */
static uint32_t agree(uint8_t *slot, uint32_t kind, int conn, size_t len) {
    if (daemon_gone) return GAIA_RESULT_LOST;
    *u32at(slot, GAIA_SLOT_KIND) = kind;
    *u32at(slot, GAIA_SLOT_CONN) = (uint32_t)conn;
    *u32at(slot, GAIA_SLOT_LEN) = (uint32_t)len;
    uint32_t *state = u32at(slot, GAIA_SLOT_STATE);
    __atomic_store_n(state, GAIA_SLOT_SUBMITTED, __ATOMIC_RELEASE);
    __atomic_fetch_add(u32at(seg, GAIA_HDR_DOORBELL), 1, __ATOMIC_RELEASE);
    futex(u32at(seg, GAIA_HDR_DOORBELL), FUTEX_WAKE, 1, NULL);

    for (int spin = 0; spin < SPINS; spin++) {
        if (__atomic_load_n(state, __ATOMIC_ACQUIRE) == GAIA_SLOT_DONE)
            return *u32at(slot, GAIA_SLOT_RESULT);
        __builtin_ia32_pause();
    }
    uint64_t beat = __atomic_load_n(u64at(seg, GAIA_HDR_BEAT), __ATOMIC_RELAXED);
    int64_t heard = now_ns();
    const struct timespec step = {0, 20 * 1000 * 1000};
    for (;;) {
        uint32_t s = __atomic_load_n(state, __ATOMIC_ACQUIRE);
        if (s == GAIA_SLOT_DONE) return *u32at(slot, GAIA_SLOT_RESULT);
        futex(state, FUTEX_WAIT, s, &step);
        uint64_t b = __atomic_load_n(u64at(seg, GAIA_HDR_BEAT), __ATOMIC_RELAXED);
        if (b != beat) {
            beat = b;
            heard = now_ns();
        } else if (now_ns() - heard > DAEMON_SILENCE_NS) {
            say("the replica daemon stopped answering: inputs are no longer delivered");
            daemon_gone = 1; /* the slot stays taken: nobody will answer it */
            return GAIA_RESULT_LOST;
        }
    }
}

/* The input path for a leader's client connection: `fill` does the real read into the slot,
 * the bytes are agreed, then `deliver` copies them to the caller's buffers. */
typedef ssize_t (*fill_fn)(int fd, void *dst, size_t cap, void *ctx);
typedef void (*deliver_fn)(const uint8_t *src, size_t n, void *ctx);

static ssize_t agreed_input(int fd, int conn, size_t want, fill_fn fill, deliver_fn deliver, void *ctx) {
    if (role() != GAIA_ROLE_LEADER) { /* deposed: this client's inputs can no longer be agreed */
        errno = ECONNRESET;
        return -1;
    }
    uint8_t *slot = claim_slot();
    ssize_t n = fill(fd, slot + GAIA_SLOT_DATA, slot_capacity(want), ctx);
    if (n <= 0) {
        int saved = errno;
        release_slot(slot);
        errno = saved;
        return n;
    }
    uint32_t result = agree(slot, GAIA_KIND_DATA, conn, (size_t)n);
    if (result == GAIA_RESULT_OK) {
        deliver(slot + GAIA_SLOT_DATA, (size_t)n, ctx);
        count(GAIA_HDR_CALLS, 1);
        count(GAIA_HDR_BYTES, (uint64_t)n);
        __atomic_fetch_add(u64at(conn_at(conn), GAIA_CONN_IN_BYTES), (uint64_t)n, __ATOMIC_RELEASE);
    }
    finish(slot);
    if (result != GAIA_RESULT_OK) {
        count(GAIA_HDR_LOST, 1);
        errno = ECONNRESET;
        return -1;
    }
    return n;
}

/* Any input call: agreed on a leader's client connection, counted on a replay connection. */
static ssize_t input(int fd, size_t want, fill_fn fill, deliver_fn deliver, void *ctx, int direct) {
    int conn = tracked(fd);
    if (conn < 0 || direct) return fill(fd, NULL, want, ctx);
    if (__atomic_load_n(u32at(conn_at(conn), GAIA_CONN_STATE), __ATOMIC_ACQUIRE) == GAIA_CONN_CLIENT)
        return agreed_input(fd, conn, want, fill, deliver, ctx);
    ssize_t n = fill(fd, NULL, want, ctx);
    if (n > 0) __atomic_fetch_add(u64at(conn_at(conn), GAIA_CONN_IN_BYTES), (uint64_t)n, __ATOMIC_RELEASE);
    return n;
}

static void account_output(int fd, const struct iovec *iov, int iovcnt, ssize_t sent) {
    int conn = tracked(fd);
    if (conn < 0 || sent <= 0) return;
    uint8_t *c = conn_at(conn);
    uint32_t crc = *u32at(c, GAIA_CONN_OUT_CRC);
    size_t left = (size_t)sent;
    for (int i = 0; i < iovcnt && left > 0; i++) {
        size_t n = iov[i].iov_len < left ? iov[i].iov_len : left;
        crc = crc_update(crc, iov[i].iov_base, n);
        left -= n;
    }
    *u32at(c, GAIA_CONN_OUT_CRC) = crc;
    __atomic_fetch_add(u64at(c, GAIA_CONN_OUT_BYTES), (uint64_t)sent, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------ connections */

static int refuse(int fd, const char *why) {
    static int said;
    if (!__atomic_exchange_n(&said, 1, __ATOMIC_RELAXED)) say(why);
    real_close(fd);
    count(GAIA_HDR_REFUSED, 1);
    errno = ECONNABORTED;
    return -1;
}

static void reset_conn(uint8_t *c) {
    *u64at(c, GAIA_CONN_OUT_BYTES) = 0;
    *u32at(c, GAIA_CONN_OUT_CRC) = 0;
    *u64at(c, GAIA_CONN_IN_BYTES) = 0;
}

static int take_client_entry(void) {
    for (int i = 0; i < GAIA_CONNS / 2; i++) {
        uint32_t expect = GAIA_CONN_FREE;
        if (__atomic_compare_exchange_n(u32at(conn_at(i), GAIA_CONN_STATE), &expect, GAIA_CONN_CLIENT,
                                        0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            reset_conn(conn_at(i));
            return i;
        }
    }
    return -1;
}

static int take_replay_entry(uint32_t port) {
    for (int i = GAIA_CONNS / 2; i < GAIA_CONNS; i++) {
        uint8_t *c = conn_at(i);
        uint32_t expect = GAIA_CONN_REGISTERED;
        if (__atomic_load_n(u32at(c, GAIA_CONN_PORT), __ATOMIC_ACQUIRE) == port &&
            __atomic_compare_exchange_n(u32at(c, GAIA_CONN_STATE), &expect, GAIA_CONN_REPLAY, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return i;
    }
    return -1;
}

/* A connection the server just accepted: a client on the leader (agreed as CONNECT), a replay
 * connection on a backup, refused otherwise. */
static int admit(int fd) {
    if (fd < 0 || !active) return fd;
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0 ||
        (peer.ss_family != AF_INET && peer.ss_family != AF_INET6))
        return fd; /* a Unix-domain or unknown socket: not a network input */
    if (fd >= FD_LIMIT) return refuse(fd, "descriptor beyond the shim's table: refusing the client");
    /* the daemon's own connections (replay, read-only queries), whatever the role */
    uint32_t port = peer.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&peer)->sin_port)
                                              : ntohs(((struct sockaddr_in6 *)&peer)->sin6_port);
    int replay = take_replay_entry(port);
    if (replay >= 0) {
        __atomic_store_n(&fdconn[fd], replay + 1, __ATOMIC_RELEASE);
        return fd;
    }
    uint32_t r = role();
    if (r == GAIA_ROLE_BACKUP) return refuse(fd, "a client connected to a backup: refused (clients go to the leader)");
    if (r != GAIA_ROLE_LEADER) return refuse(fd, "not the leader (yet): refusing clients");
    int conn = take_client_entry();
    if (conn < 0) return refuse(fd, "connection table full: refusing the client");
    uint8_t *slot = claim_slot();
    uint32_t result = agree(slot, GAIA_KIND_CONNECT, conn, 0);
    finish(slot);
    if (result != GAIA_RESULT_OK) {
        __atomic_store_n(u32at(conn_at(conn), GAIA_CONN_STATE), GAIA_CONN_FREE, __ATOMIC_RELEASE);
        count(GAIA_HDR_LOST, 1);
        return refuse(fd, "a connection could not be agreed: refusing the client");
    }
    __atomic_store_n(&fdconn[fd], conn + 1, __ATOMIC_RELEASE);
    return fd;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) { return admit(real_accept(fd, addr, len)); }

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    return admit(real_accept4(fd, addr, len, flags));
}

int close(int fd) {
    int conn = tracked(fd);
    if (conn >= 0) {
        __atomic_store_n(&fdconn[fd], 0, __ATOMIC_RELEASE);
        uint32_t *state = u32at(conn_at(conn), GAIA_CONN_STATE);
        if (__atomic_load_n(state, __ATOMIC_ACQUIRE) == GAIA_CONN_CLIENT) {
            if (role() == GAIA_ROLE_LEADER) { /* the backups close their replay connection too */
                uint8_t *slot = claim_slot();
                agree(slot, GAIA_KIND_CLOSE, conn, 0);
                finish(slot);
            }
            __atomic_store_n(state, GAIA_CONN_FREE, __ATOMIC_RELEASE);
        } /* a replay entry is the daemon's to free */
    }
    return real_close(fd);
}

/* ------------------------------------------------------------------ input calls */

struct flat { void *buf; int flags; struct sockaddr *addr; socklen_t *alen; int how; };
enum { VIA_READ, VIA_RECV, VIA_RECVFROM };

static ssize_t fill_flat(int fd, void *dst, size_t cap, void *ctx) {
    struct flat *f = ctx;
    void *to = dst ? dst : f->buf;
    switch (f->how) {
    case VIA_READ: return real_read(fd, to, cap);
    case VIA_RECV: return real_recv(fd, to, cap, f->flags);
    default: return real_recvfrom(fd, to, cap, f->flags, f->addr, f->alen);
    }
}

static void deliver_flat(const uint8_t *src, size_t n, void *ctx) { memcpy(((struct flat *)ctx)->buf, src, n); }

ssize_t read(int fd, void *buf, size_t count) {
    struct flat f = {buf, 0, NULL, NULL, VIA_READ};
    return input(fd, count, fill_flat, deliver_flat, &f, 0);
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
    struct flat f = {buf, flags, NULL, NULL, VIA_RECV};
    return input(fd, len, fill_flat, deliver_flat, &f, flags & MSG_PEEK);
}

ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *alen) {
    struct flat f = {buf, flags, addr, alen, VIA_RECVFROM};
    return input(fd, len, fill_flat, deliver_flat, &f, flags & MSG_PEEK);
}

struct vec { const struct iovec *iov; int iovcnt; struct msghdr *msg; int flags; };

static size_t iov_total(const struct iovec *iov, int iovcnt) {
    size_t t = 0;
    for (int i = 0; i < iovcnt; i++) t += iov[i].iov_len;
    return t;
}

static ssize_t fill_vec(int fd, void *dst, size_t cap, void *ctx) {
    struct vec *v = ctx;
    if (v->msg == NULL) return dst ? real_read(fd, dst, cap) : real_readv(fd, v->iov, v->iovcnt);
    if (dst == NULL) return real_recvmsg(fd, v->msg, v->flags);
    struct iovec one = {dst, cap};
    struct msghdr m = *v->msg;
    m.msg_iov = &one;
    m.msg_iovlen = 1;
    ssize_t n = real_recvmsg(fd, &m, v->flags);
    v->msg->msg_flags = m.msg_flags;
    v->msg->msg_controllen = m.msg_controllen;
    v->msg->msg_namelen = m.msg_namelen;
    return n;
}

static void deliver_vec(const uint8_t *src, size_t n, void *ctx) {
    struct vec *v = ctx;
    for (int i = 0; i < v->iovcnt && n > 0; i++) {
        size_t k = v->iov[i].iov_len < n ? v->iov[i].iov_len : n;
        memcpy(v->iov[i].iov_base, src, k);
        src += k;
        n -= k;
    }
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
    struct vec v = {iov, iovcnt, NULL, 0};
    return input(fd, iov_total(iov, iovcnt), fill_vec, deliver_vec, &v, 0);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    struct vec v = {msg->msg_iov, (int)msg->msg_iovlen, msg, flags};
    return input(fd, iov_total(msg->msg_iov, (int)msg->msg_iovlen), fill_vec, deliver_vec, &v,
                 flags & MSG_PEEK);
}

/* ------------------------------------------------------------------ output calls */

ssize_t write(int fd, const void *buf, size_t count) {
    ssize_t n = real_write(fd, buf, count);
    struct iovec one = {(void *)buf, count};
    account_output(fd, &one, 1, n);
    return n;
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    ssize_t n = real_send(fd, buf, len, flags);
    struct iovec one = {(void *)buf, len};
    account_output(fd, &one, 1, n);
    return n;
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t alen) {
    ssize_t n = real_sendto(fd, buf, len, flags, addr, alen);
    struct iovec one = {(void *)buf, len};
    account_output(fd, &one, 1, n);
    return n;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    ssize_t n = real_sendmsg(fd, msg, flags);
    account_output(fd, msg->msg_iov, (int)msg->msg_iovlen, n);
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    ssize_t n = real_writev(fd, iov, iovcnt);
    account_output(fd, iov, iovcnt, n);
    return n;
}
