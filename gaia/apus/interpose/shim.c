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
 * the log. The replayer announces every input it sends as a turn (connection, length) in log
 * order, and the server may read a replay connection only in its turn: a read on another one
 * fails with EAGAIN (it stays readable, and the event loop comes back to it), or waits, on a
 * blocking socket. So the server reads its inputs in the leader's order across connections,
 * whatever order the kernel and epoll hand them over in, and the replayer never has to wait
 * for a read before sending on. For every connection the shim counts the bytes the server
 * read (the replayer's quiet points and output checks wait on it) and keeps a running crc32 of
 * what the server wrote (the output checker compares it across replicas).
 *
 * Batching at the event loop: a server that waits in epoll_wait is told of several ready clients
 * at once, and would then read them one by one, each read waiting a whole consensus round. So
 * when epoll_wait returns, the shim reads the ready client connections itself (as much as the
 * server's last read on each asked for), hands all those inputs to the daemon together (they go
 * into the log in that order, in one round) and keeps each agreed input for that connection's
 * next read. Input held this way keeps its descriptor reported readable (epoll_ctl tells the
 * shim what each descriptor was registered with), so a server that reads less than was agreed
 * still gets the rest. Nothing is delivered before it is committed, as without batching.
 *
 * Execution in log order: a multithreaded server (memcached) would otherwise run the inputs
 * two threads read at once in its scheduler's order, differently on every replica, and
 * conflicting writes from concurrent connections would diverge. So one input executes at a
 * time, in log order, on every replica: an input is handed to the server only once the one
 * before it has executed, which is when the thread that read it comes back for more (its next
 * input call on a client or replay connection, epoll_wait, accept or close: by then it has
 * acted on what it read). On the leader the daemon numbers the inputs in log order
 * (slot.order) and a read waits for its number to come up; on a backup a turn stays the
 * server's until the thread that read it comes back. A single-threaded server never waits (its
 * thread comes back before its next read). A read that would wait for input this same thread
 * holds agreed ahead on another connection, or that waited 1 s (a thread that acts on one input
 * only after reading another), delivers at once and is counted (out_of_order).
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
#include <sys/epoll.h>
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
typedef int (*epoll_ctl_fn)(int, int, int, struct epoll_event *);
typedef int (*epoll_wait_fn)(int, struct epoll_event *, int, int);
typedef int (*epoll_pwait_fn)(int, struct epoll_event *, int, int, const sigset_t *);

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
static epoll_ctl_fn real_epoll_ctl;
static epoll_wait_fn real_epoll_wait;
static epoll_pwait_fn real_epoll_pwait;

static uint8_t *seg;          /* the mapped segment; NULL: inert */
static int active;            /* attached, and this is the process that attached */
static int daemon_gone;       /* set once the daemon's heartbeat stopped */
static int32_t fdconn[FD_LIMIT]; /* fd -> connection entry + 1 (0: not ours) */
static int32_t connfd[GAIA_CONNS]; /* replay connection entry -> fd + 1 (0: not accepted yet) */
static __thread int my_epfd = -1;  /* the epoll instance this thread waits on (its event loop) */
static uint32_t crc_table[256];

/* What the server registered each descriptor with (the last epoll_ctl on it), so that an event
 * epoll_wait returns can be traced back to its descriptor (Redis and libevent put the descriptor
 * itself in the event's data) and a descriptor holding input agreed ahead reported again. */
struct watch {
    int epfd1; /* the epoll instance + 1; 0: not registered */
    uint32_t events;
    uint64_t data;
};
static struct watch watches[FD_LIMIT];

/* Input agreed ahead of the server's read, at epoll_wait; touched only by the thread that
 * waits on the connection's epoll instance (one event loop per thread, as in memcached). */
#define AHEAD_EOF (-1) /* ahead.end: the client closed its side */
struct ahead {
    uint8_t *buf;
    uint32_t cap, len, off;
    int end; /* once the bytes are read: 0 more may come, AHEAD_EOF, or the errno to fail with */
    int listed; /* in its thread's ahead_fds */
    uint32_t order; /* the bytes' place in the execution order (GAIA_NO_ORDER: none) */
    int started;    /* some of them reached the server already */
};
static struct ahead aheads[FD_LIMIT];
static uint32_t asked[FD_LIMIT]; /* the size of the server's last read on each descriptor */

#define AHEAD_MAX 256 /* descriptors one thread may hold agreed input for */

/* The turn the server is in (a backup's replay reads): taken under the lock, by any thread. */
static pthread_mutex_t turn_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t turn_head; /* the turn being read */
static uint32_t turn_left; /* its bytes not read yet; 0: not started */
static int turn_read;      /* the head turn is read in full; it moves once its thread is back */
static int turn_waiters;   /* threads asleep until the head turn moves */

/* The leader's execution order (see the top): inputs executed out of order so far are kept
 * here (order + 1 at order % ORDER_RING) until the ones before them are, then RELEASED moves. */
#define ORDER_RING 65536
#define ORDER_WAIT_NS (1000LL * 1000 * 1000)
static pthread_mutex_t order_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t executed[ORDER_RING];
static int order_waiters;
static __thread uint32_t owed_order = GAIA_NO_ORDER; /* delivered by this thread, executing */
static __thread int owes_turn;                       /* this thread read the head turn in full */
static __thread int ahead_fds[AHEAD_MAX];
static __thread int n_ahead;

/* ------------------------------------------------------------------ segment access */

static inline uint32_t *u32at(uint8_t *base, size_t off) { return (uint32_t *)(base + off); }
static inline uint64_t *u64at(uint8_t *base, size_t off) { return (uint64_t *)(base + off); }
static inline uint8_t *slot_at(int i) { return seg + GAIA_SLOTS_OFFSET + (size_t)i * GAIA_SLOT_SIZE; }
static inline uint8_t *conn_at(int i) { return seg + GAIA_CONNS_OFFSET + (size_t)i * GAIA_CONN_SIZE; }
static inline uint8_t *turn_at(uint32_t i) {
    return seg + GAIA_TURNS_OFFSET + (size_t)(i % GAIA_TURNS) * GAIA_TURN_SIZE;
}
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
    RESOLVE(epoll_ctl);
    RESOLVE(epoll_wait);
    RESOLVE(epoll_pwait);
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
    turn_head = __atomic_load_n(u32at(seg, GAIA_HDR_TURN_HEAD), __ATOMIC_ACQUIRE);
    for (int i = 0; i < FD_LIMIT; i++) aheads[i].order = GAIA_NO_ORDER;
    __atomic_store_n(u32at(seg, GAIA_HDR_PID), (uint32_t)getpid(), __ATOMIC_RELEASE);
    pthread_atfork(NULL, NULL, child_after_fork);
    active = 1;
}

/* ------------------------------------------------------------------ agreeing on an input */

static int tracked(int fd) {
    if (!active || fd < 0 || fd >= FD_LIMIT) return -1;
    return __atomic_load_n(&fdconn[fd], __ATOMIC_ACQUIRE) - 1;
}

/* A free slot, or NULL if all are in use right now. */
static uint8_t *try_claim_slot(void) {
    static __thread unsigned hint;
    for (int k = 0; k < GAIA_SLOTS; k++) {
        int i = (int)((hint + (unsigned)k) % GAIA_SLOTS);
        uint32_t expect = GAIA_SLOT_FREE;
        if (__atomic_compare_exchange_n(u32at(slot_at(i), GAIA_SLOT_STATE), &expect, GAIA_SLOT_CLAIMED,
                                        0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            hint = (unsigned)i + 1;
            return slot_at(i);
        }
    }
    return NULL;
}

static uint8_t *claim_slot(void) {
    uint8_t *slot;
    while ((slot = try_claim_slot()) == NULL) sched_yield();
    return slot;
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

/* Hand a filled slot to the daemon as submission `seq` (it looks once the doorbell rings). */
static void submit_as(uint8_t *slot, uint32_t kind, int conn, size_t len, uint32_t seq) {
    *u32at(slot, GAIA_SLOT_KIND) = kind;
    *u32at(slot, GAIA_SLOT_CONN) = (uint32_t)conn;
    *u32at(slot, GAIA_SLOT_LEN) = (uint32_t)len;
    *u32at(slot, GAIA_SLOT_ORDER) = GAIA_NO_ORDER; /* the daemon's to set, with the result */
    *u32at(slot, GAIA_SLOT_SEQ) = seq;
    __atomic_store_n(u32at(slot, GAIA_SLOT_STATE), GAIA_SLOT_SUBMITTED, __ATOMIC_RELEASE);
}

/* Sequence numbers for `n` submissions in a row: one thread's batch stays together in the log,
 * so its inputs execute one after another instead of alternating with another thread's. */
static uint32_t take_seqs(uint32_t n) { return __atomic_fetch_add(u32at(seg, GAIA_HDR_SEQ), n, __ATOMIC_RELAXED); }

static void submit(uint8_t *slot, uint32_t kind, int conn, size_t len) {
    submit_as(slot, kind, conn, len, take_seqs(1));
}

static void ring(void) {
    __atomic_fetch_add(u32at(seg, GAIA_HDR_DOORBELL), 1, __ATOMIC_RELEASE);
    futex(u32at(seg, GAIA_HDR_DOORBELL), FUTEX_WAKE, 1, NULL);
    count(GAIA_HDR_ROUNDS, 1);
}

/* Wait for the daemon's verdict on a submitted slot: GAIA_RESULT_OK once committed. */
static uint32_t verdict(uint8_t *slot) {
    if (daemon_gone) return GAIA_RESULT_LOST;
    uint32_t *state = u32at(slot, GAIA_SLOT_STATE);
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

static uint32_t agree(uint8_t *slot, uint32_t kind, int conn, size_t len) {
    if (daemon_gone) return GAIA_RESULT_LOST;
    submit(slot, kind, conn, len);
    ring();
    return verdict(slot);
}

/* An agreed input reaches the server: count it where the breakdown and the replayer look. */
static void delivered(int conn, size_t n) {
    count(GAIA_HDR_CALLS, 1);
    count(GAIA_HDR_BYTES, (uint64_t)n);
    __atomic_fetch_add(u64at(conn_at(conn), GAIA_CONN_IN_BYTES), (uint64_t)n, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------ execution order */

static inline int earlier(uint32_t a, uint32_t b) { return (int32_t)(a - b) < 0; }

/* Input `order` has executed (or will never reach the server): move RELEASED past every input
 * executed so far without a gap, and wake the threads waiting for theirs. */
static void executed_input(uint32_t order) {
    if (order == GAIA_NO_ORDER) return;
    uint32_t *released = u32at(seg, GAIA_HDR_RELEASED);
    pthread_mutex_lock(&order_lock);
    executed[order % ORDER_RING] = order + 1;
    uint32_t r = __atomic_load_n(released, __ATOMIC_ACQUIRE), from = r;
    while (executed[r % ORDER_RING] == r + 1) executed[r++ % ORDER_RING] = 0;
    if (r != from) {
        __atomic_store_n(released, r, __ATOMIC_RELEASE);
        if (__atomic_load_n(&order_waiters, __ATOMIC_ACQUIRE)) futex(released, FUTEX_WAKE, INT32_MAX, NULL);
    }
    pthread_mutex_unlock(&order_lock);
}

/* Whether this thread holds input `order` agreed ahead (its own event loop must read it). */
static int holds_order(uint32_t order) {
    for (int i = 0; i < n_ahead; i++)
        if (aheads[ahead_fds[i]].order == order) return 1;
    return 0;
}

/* Hold a committed input until every input before it in the log has executed. */
static void wait_order(uint32_t order) {
    if (order == GAIA_NO_ORDER) return;
    uint32_t *released = u32at(seg, GAIA_HDR_RELEASED);
    int64_t deadline = 0;
    for (int spin = 0;; spin++) {
        uint32_t r = __atomic_load_n(released, __ATOMIC_ACQUIRE);
        if (!earlier(r, order)) return;
        if (spin < SPINS) {
            sched_yield();
            continue;
        }
        int64_t now = now_ns();
        if (deadline == 0) {
            deadline = now + ORDER_WAIT_NS;
        }
        if (holds_order(r)) { /* only this thread can go on: it reads that one later */
            count(GAIA_HDR_OUT_OF_ORDER, 1);
            return;
        }
        if (now > deadline) { /* its thread is not coming back (gone, or blocked on us) */
            count(GAIA_HDR_OUT_OF_ORDER, 1);
            executed_input(r); /* so that the inputs after it do not wait for it too */
            return;
        }
        const struct timespec step = {0, 1000 * 1000};
        __atomic_fetch_add(&order_waiters, 1, __ATOMIC_ACQ_REL);
        futex(released, FUTEX_WAIT, r, &step);
        __atomic_fetch_sub(&order_waiters, 1, __ATOMIC_ACQ_REL);
    }
}

/* This thread is back for more: what it read last has executed (see the top). */
static void thread_is_back(void) {
    if (owed_order != GAIA_NO_ORDER) {
        uint32_t order = owed_order;
        owed_order = GAIA_NO_ORDER;
        executed_input(order);
    }
    if (owes_turn) {
        owes_turn = 0;
        pthread_mutex_lock(&turn_lock);
        turn_read = 0; /* (turn_left is 0: the turn was read in full) */
        __atomic_store_n(u32at(seg, GAIA_HDR_TURN_HEAD), ++turn_head, __ATOMIC_RELEASE);
        if (__atomic_load_n(&turn_waiters, __ATOMIC_ACQUIRE))
            futex(u32at(seg, GAIA_HDR_TURN_HEAD), FUTEX_WAKE, INT32_MAX, NULL);
        pthread_mutex_unlock(&turn_lock);
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
    uint32_t order = *u32at(slot, GAIA_SLOT_ORDER); /* NO_ORDER unless the daemon numbered it */
    if (result == GAIA_RESULT_OK) {
        wait_order(order);
        deliver(slot + GAIA_SLOT_DATA, (size_t)n, ctx);
        delivered(conn, (size_t)n);
        owed_order = order;
    } else {
        executed_input(order); /* it never reaches the server */
    }
    finish(slot);
    if (result != GAIA_RESULT_OK) {
        count(GAIA_HDR_LOST, 1);
        errno = ECONNRESET;
        return -1;
    }
    return n;
}

/* ------------------------------------------------------------------ input agreed ahead */

static int holds_ahead(int fd) { return aheads[fd].len > aheads[fd].off || aheads[fd].end != 0; }

#define NOTHING_AHEAD (-2)

/* A read served from input agreed ahead: its bytes, then the end it met; NOTHING_AHEAD if the
 * connection holds none. A peek leaves the bytes in place. */
static ssize_t read_ahead(int fd, int conn, size_t want, deliver_fn deliver, void *ctx, int peek) {
    struct ahead *a = &aheads[fd];
    if (a->len > a->off) {
        size_t n = a->len - a->off < want ? a->len - a->off : want;
        if (!peek && !a->started) {
            wait_order(a->order);
            a->started = 1;
        }
        deliver(a->buf + a->off, n, ctx);
        if (!peek) {
            a->off += (uint32_t)n;
            if (a->off == a->len) { /* all of it handed over: executed once this thread is back */
                a->off = a->len = 0;
                owed_order = a->order;
                a->order = GAIA_NO_ORDER;
            }
            delivered(conn, n);
        }
        return (ssize_t)n;
    }
    if (a->end == 0) return NOTHING_AHEAD;
    if (a->end == AHEAD_EOF) return 0;
    errno = a->end;
    return -1;
}

static void list_ahead(int fd) {
    if (!aheads[fd].listed) {
        aheads[fd].listed = 1;
        ahead_fds[n_ahead++] = fd;
    }
}

/* Keep an agreed input for the connection's next reads (the caller checked there is room). */
static void hold_ahead(int fd, const uint8_t *src, uint32_t n, uint32_t order) {
    struct ahead *a = &aheads[fd];
    if (a->cap < n) {
        uint8_t *grown = realloc(a->buf, n);
        if (grown == NULL) { /* cannot keep what was agreed: the client is dropped, not fooled */
            a->end = ECONNRESET;
            list_ahead(fd);
            executed_input(order);
            return;
        }
        a->buf = grown;
        a->cap = n;
    }
    memcpy(a->buf, src, n);
    a->off = 0;
    a->len = n;
    a->order = order;
    a->started = 0;
    list_ahead(fd);
}

static void end_ahead(int fd, int end) {
    aheads[fd].end = end;
    list_ahead(fd);
}

/* The descriptor is closed: what the server did not read of its agreed input is lost to it,
 * while the backups replay it. Counted and said, because it can make them differ. */
static void drop_ahead(int fd) {
    struct ahead *a = &aheads[fd];
    if (a->len > a->off) {
        static int said;
        count(GAIA_HDR_DISCARDED, a->len - a->off);
        if (!__atomic_exchange_n(&said, 1, __ATOMIC_RELAXED))
            say("the server closed a connection without reading input agreed for it");
    }
    a->len = a->off = 0;
    a->end = 0; /* the thread's list forgets it at its next epoll_wait */
    uint32_t order = a->order;
    a->order = GAIA_NO_ORDER;
    executed_input(order); /* what was not read never executes */
}

/* Events for this thread's descriptors of `epfd` that hold agreed input (the kernel no longer
 * sees it), at most `max`; the list is pruned of those drained or closed meanwhile. */
static int report_ahead(int epfd, struct epoll_event *ev, int max) {
    int n = 0, kept = 0;
    for (int i = 0; i < n_ahead; i++) {
        int fd = ahead_fds[i];
        if (!holds_ahead(fd)) {
            aheads[fd].listed = 0;
            continue;
        }
        ahead_fds[kept++] = fd;
        struct watch *w = &watches[fd];
        if (n < max && w->epfd1 == epfd + 1 && (w->events & EPOLLIN)) {
            ev[n].events = EPOLLIN;
            ev[n].data.u64 = w->data;
            n++;
        }
    }
    n_ahead = kept;
    return n;
}

static int event_fd(int epfd, const struct epoll_event *e) {
    int fd = e->data.fd;
    if (fd < 0 || fd >= FD_LIMIT) return -1;
    const struct watch *w = &watches[fd];
    return w->epfd1 == epfd + 1 && w->data == e->data.u64 ? fd : -1;
}

/* The kernel's events after `n` reported ones: one that repeats a reported descriptor is
 * folded into it. Returns how many of the kernel's remain, moved up behind the reported. */
static int fold_repeats(int epfd, struct epoll_event *ev, int n, int r) {
    int kept = 0;
    for (int i = 0; i < r; i++) {
        struct epoll_event e = ev[n + i];
        int fd = event_fd(epfd, &e), folded = 0;
        if (fd >= 0 && holds_ahead(fd))
            for (int j = 0; j < n && !folded; j++)
                if (ev[j].data.u64 == e.data.u64) {
                    ev[j].events |= e.events;
                    folded = 1;
                }
        if (!folded) ev[n + kept++] = e;
    }
    return kept;
}

/* The leader's batch: read every ready client connection that holds nothing ahead, agree all
 * those inputs in one round, keep each for its connection's next read. */
static void agree_ahead(int epfd, const struct epoll_event *ev, int r) {
    uint8_t *slots[GAIA_SLOTS];
    uint32_t lens[GAIA_SLOTS];
    int fds[GAIA_SLOTS], conns[GAIA_SLOTS], k = 0;
    for (int i = 0; i < r && k < GAIA_SLOTS && n_ahead + k < AHEAD_MAX; i++) {
        if (!(ev[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) continue;
        int fd = event_fd(epfd, &ev[i]);
        if (fd < 0 || (watches[fd].events & EPOLLONESHOT) || holds_ahead(fd)) continue;
        int conn = tracked(fd);
        if (conn < 0 ||
            __atomic_load_n(u32at(conn_at(conn), GAIA_CONN_STATE), __ATOMIC_ACQUIRE) != GAIA_CONN_CLIENT)
            continue;
        uint8_t *slot = try_claim_slot();
        if (slot == NULL) break;
        ssize_t n = real_recv(fd, slot + GAIA_SLOT_DATA, slot_capacity(asked[fd] ? asked[fd] : GAIA_DATA_CAP),
                              MSG_DONTWAIT);
        if (n <= 0) {
            int e = errno;
            release_slot(slot);
            if (n == 0) end_ahead(fd, AHEAD_EOF);
            else if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR) end_ahead(fd, e);
            continue;
        }
        lens[k] = (uint32_t)n;
        conns[k] = conn;
        slots[k] = slot;
        fds[k++] = fd;
    }
    if (k == 0) return;
    uint32_t seq = take_seqs((uint32_t)k);
    for (int j = 0; j < k; j++) submit_as(slots[j], GAIA_KIND_DATA, conns[j], lens[j], seq + (uint32_t)j);
    ring();
    for (int j = 0; j < k; j++) {
        uint32_t result = verdict(slots[j]);
        uint32_t order = *u32at(slots[j], GAIA_SLOT_ORDER);
        if (result == GAIA_RESULT_OK) {
            hold_ahead(fds[j], slots[j] + GAIA_SLOT_DATA, *u32at(slots[j], GAIA_SLOT_LEN), order);
            count(GAIA_HDR_AHEAD, 1);
        } else {
            end_ahead(fds[j], ECONNRESET);
            executed_input(order);
            count(GAIA_HDR_LOST, 1);
        }
        finish(slots[j]);
    }
}

/* A backup's events in the order of the turns ahead (anything not a replay connection first:
 * the listening socket may bring the next turn's connection), so that the server's reads
 * mostly come in their turn instead of failing and coming back. */
#define ORDER_SCAN 1024 /* turns looked ahead */
static void order_by_turns(int epfd, struct epoll_event *ev, int r) {
    static __thread uint32_t gen, seen_gen[GAIA_CONNS], seen_at[GAIA_CONNS];
    static __thread uint32_t key[ORDER_SCAN];
    if (r < 2 || r > ORDER_SCAN) return;
    pthread_mutex_lock(&turn_lock);
    uint32_t head = turn_head;
    pthread_mutex_unlock(&turn_lock);
    uint32_t ahead = __atomic_load_n(u32at(seg, GAIA_HDR_TURN_TAIL), __ATOMIC_ACQUIRE) - head;
    if (ahead > ORDER_SCAN) ahead = ORDER_SCAN;
    gen++;
    for (uint32_t k = 0; k < ahead; k++) {
        uint32_t c = *u32at(turn_at(head + k), GAIA_TURN_CONN);
        if (c < GAIA_CONNS && seen_gen[c] != gen) {
            seen_gen[c] = gen;
            seen_at[c] = k + 1;
        }
    }
    for (int i = 0; i < r; i++) {
        int fd = event_fd(epfd, &ev[i]), conn = fd >= 0 ? tracked(fd) : -1;
        if (conn < 0 || !__atomic_load_n(u32at(conn_at(conn), GAIA_CONN_ORDERED), __ATOMIC_ACQUIRE))
            key[i] = 0;
        else
            key[i] = seen_gen[conn] == gen ? seen_at[conn] : UINT32_MAX;
    }
    for (int i = 1; i < r; i++) { /* insertion sort, stable: r is small */
        struct epoll_event e = ev[i];
        uint32_t k = key[i];
        int j = i - 1;
        for (; j >= 0 && key[j] > k; j--) {
            ev[j + 1] = ev[j];
            key[j + 1] = key[j];
        }
        ev[j + 1] = e;
        key[j + 1] = k;
    }
}

static int waited(int epfd, struct epoll_event *ev, int max, int timeout, const sigset_t *mask, int masked) {
    if (!active || max <= 0)
        return masked ? real_epoll_pwait(epfd, ev, max, timeout, mask) : real_epoll_wait(epfd, ev, max, timeout);
    thread_is_back();
    my_epfd = epfd;
    int n = report_ahead(epfd, ev, max), r = 0;
    if (n < max) {
        int t = n ? 0 : timeout;
        r = masked ? real_epoll_pwait(epfd, ev + n, max - n, t, mask) : real_epoll_wait(epfd, ev + n, max - n, t);
        if (r < 0) {
            if (n == 0) return r;
            r = 0;
        }
        r = fold_repeats(epfd, ev, n, r);
    }
    if (role() == GAIA_ROLE_LEADER && !daemon_gone) agree_ahead(epfd, ev + n, r);
    else order_by_turns(epfd, ev + n, r);
    return n + r;
}

int epoll_wait(int epfd, struct epoll_event *ev, int max, int timeout) {
    return waited(epfd, ev, max, timeout, NULL, 0);
}

int epoll_pwait(int epfd, struct epoll_event *ev, int max, int timeout, const sigset_t *mask) {
    return waited(epfd, ev, max, timeout, mask, 1);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event) {
    int r = real_epoll_ctl(epfd, op, fd, event);
    if (r == 0 && active && fd >= 0 && fd < FD_LIMIT) {
        struct watch *w = &watches[fd];
        if (op == EPOLL_CTL_DEL || event == NULL) {
            w->epfd1 = 0;
        } else {
            w->events = event->events;
            w->data = event->data.u64;
            w->epfd1 = epfd + 1;
        }
    }
    return r;
}

/* ------------------------------------------------------------------ a backup's turns */

/* Whether a thread other than this one will read the turn of replay entry `conn`: its
 * connection is watched by another epoll instance (another worker's event loop). This thread
 * may then wait a little for the turn to move; if its own event loop must read it, waiting
 * would never end, so a wait is only ever one short sleep per read. */
static int elsewhere(uint32_t conn) {
    if (conn >= GAIA_CONNS || my_epfd < 0) return 0;
    int fd1 = __atomic_load_n(&connfd[conn], __ATOMIC_ACQUIRE);
    if (fd1 == 0) return 0; /* not accepted yet: by whom is not known here */
    int epfd1 = watches[fd1 - 1].epfd1;
    return epfd1 != 0 && epfd1 != my_epfd + 1;
}

/* A read on an ordered replay connection, as much as its turn allows (never into the next
 * one); EAGAIN, or a wait on a blocking socket, while another connection's turn comes first.
 * The connection's end is read whenever it comes. */
static ssize_t replay_input(int fd, int conn, size_t want, fill_fn fill, void *ctx) {
    int slept = 0;
    for (int waited = 0;; waited++) {
        pthread_mutex_lock(&turn_lock);
        uint32_t tail = __atomic_load_n(u32at(seg, GAIA_HDR_TURN_TAIL), __ATOMIC_ACQUIRE);
        uint32_t head_conn = turn_head != tail ? *u32at(turn_at(turn_head), GAIA_TURN_CONN) : UINT32_MAX;
        uint32_t head = turn_head;
        if (head_conn == (uint32_t)conn && !turn_read) {
            if (turn_left == 0) turn_left = *u32at(turn_at(turn_head), GAIA_TURN_LEN);
            ssize_t n = fill(fd, NULL, want < turn_left ? want : turn_left, ctx);
            if (n > 0) {
                __atomic_fetch_add(u64at(conn_at(conn), GAIA_CONN_IN_BYTES), (uint64_t)n, __ATOMIC_RELEASE);
                turn_left -= (uint32_t)n;
                if (turn_left == 0) { /* the next turn once this thread is back (it executes) */
                    turn_read = 1;
                    owes_turn = 1;
                }
            }
            int saved = errno;
            pthread_mutex_unlock(&turn_lock);
            errno = saved;
            return n;
        }
        pthread_mutex_unlock(&turn_lock);
        char one;
        ssize_t peeked = real_recv(fd, &one, 1, MSG_PEEK | MSG_DONTWAIT);
        if (peeked == 0 || (peeked < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            return fill(fd, NULL, want, ctx); /* the connection's end (the replayer closes it only
                                                 once every turn was taken) or its error */
        if (waited == 0 && peeked > 0) count(GAIA_HDR_OUT_OF_TURN, 1);
        if (peeked > 0 && !slept && elsewhere(head_conn)) { /* another thread's turn: sleep */
            slept = 1;
            const struct timespec step = {0, 1000 * 1000};
            __atomic_fetch_add(&turn_waiters, 1, __ATOMIC_ACQ_REL);
            futex(u32at(seg, GAIA_HDR_TURN_HEAD), FUTEX_WAIT, head, &step);
            __atomic_fetch_sub(&turn_waiters, 1, __ATOMIC_ACQ_REL);
            continue;
        }
        int flags = fcntl(fd, F_GETFL);
        if (flags < 0 || (flags & O_NONBLOCK)) {
            errno = EAGAIN;
            return -1;
        }
        if (waited < SPINS) sched_yield();
        else usleep(50);
    }
}

/* ------------------------------------------------------------------ any input call */

/* Agreed on a leader's client connection (from what was agreed ahead first), counted on a
 * replay connection, untouched otherwise. */
static ssize_t input(int fd, size_t want, fill_fn fill, deliver_fn deliver, void *ctx, int peek) {
    int conn = tracked(fd);
    if (conn < 0) return fill(fd, NULL, want, ctx);
    if (!peek) thread_is_back();
    if (__atomic_load_n(u32at(conn_at(conn), GAIA_CONN_STATE), __ATOMIC_ACQUIRE) == GAIA_CONN_CLIENT) {
        if (!peek && want > 0) asked[fd] = want > GAIA_DATA_CAP ? GAIA_DATA_CAP : (uint32_t)want;
        ssize_t n = read_ahead(fd, conn, want, deliver, ctx, peek);
        if (n != NOTHING_AHEAD) return n;
        if (peek) return fill(fd, NULL, want, ctx);
        return agreed_input(fd, conn, want, fill, deliver, ctx);
    }
    if (peek) return fill(fd, NULL, want, ctx);
    if (__atomic_load_n(u32at(conn_at(conn), GAIA_CONN_ORDERED), __ATOMIC_ACQUIRE))
        return replay_input(fd, conn, want, fill, ctx);
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
        __atomic_store_n(&connfd[replay], fd + 1, __ATOMIC_RELEASE);
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

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    if (active) thread_is_back();
    return admit(real_accept(fd, addr, len));
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    if (active) thread_is_back();
    return admit(real_accept4(fd, addr, len, flags));
}

int close(int fd) {
    if (active && fd >= 0 && fd < FD_LIMIT) {
        if (tracked(fd) >= 0) thread_is_back();
        watches[fd].epfd1 = 0;
        drop_ahead(fd);
    }
    int conn = tracked(fd);
    if (conn >= 0) {
        __atomic_store_n(&fdconn[fd], 0, __ATOMIC_RELEASE);
        if (conn >= GAIA_CONNS / 2) __atomic_store_n(&connfd[conn], 0, __ATOMIC_RELEASE);
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

struct vec { const struct iovec *iov; int iovcnt; size_t total; struct msghdr *msg; int flags; int filled; };

static size_t iov_total(const struct iovec *iov, int iovcnt) {
    size_t t = 0;
    for (int i = 0; i < iovcnt; i++) t += iov[i].iov_len;
    return t;
}

/* The caller's buffers cut to `cap` bytes (a turn's end): at most IOV_CAP entries of `out`. */
#define IOV_CAP 64
static int cut_iov(const struct iovec *iov, int iovcnt, size_t cap, struct iovec *out) {
    int n = 0;
    for (int i = 0; i < iovcnt && cap > 0 && n < IOV_CAP; i++) {
        out[n] = iov[i];
        if (out[n].iov_len > cap) out[n].iov_len = cap;
        cap -= out[n++].iov_len;
    }
    return n;
}

static ssize_t fill_vec(int fd, void *dst, size_t cap, void *ctx) {
    struct vec *v = ctx;
    struct iovec cut[IOV_CAP];
    int whole = cap >= v->total;
    if (v->msg == NULL) {
        if (dst) return real_read(fd, dst, cap);
        return whole ? real_readv(fd, v->iov, v->iovcnt) : real_readv(fd, cut, cut_iov(v->iov, v->iovcnt, cap, cut));
    }
    if (dst == NULL && whole) return real_recvmsg(fd, v->msg, v->flags);
    if (dst == NULL) {
        struct msghdr m = *v->msg;
        m.msg_iov = cut;
        m.msg_iovlen = (size_t)cut_iov(v->iov, v->iovcnt, cap, cut);
        ssize_t n = real_recvmsg(fd, &m, v->flags);
        v->msg->msg_flags = m.msg_flags;
        v->msg->msg_controllen = m.msg_controllen;
        v->msg->msg_namelen = m.msg_namelen;
        return n;
    }
    struct iovec one = {dst, cap};
    struct msghdr m = *v->msg;
    m.msg_iov = &one;
    m.msg_iovlen = 1;
    ssize_t n = real_recvmsg(fd, &m, v->flags);
    v->msg->msg_flags = m.msg_flags;
    v->msg->msg_controllen = m.msg_controllen;
    v->msg->msg_namelen = m.msg_namelen;
    v->filled = 1;
    return n;
}

static void deliver_vec(const uint8_t *src, size_t n, void *ctx) {
    struct vec *v = ctx;
    if (v->msg != NULL && !v->filled) { /* input agreed ahead: no ancillary data, no address */
        v->msg->msg_flags = 0;
        v->msg->msg_controllen = 0;
        v->msg->msg_namelen = 0;
    }
    for (int i = 0; i < v->iovcnt && n > 0; i++) {
        size_t k = v->iov[i].iov_len < n ? v->iov[i].iov_len : n;
        memcpy(v->iov[i].iov_base, src, k);
        src += k;
        n -= k;
    }
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
    struct vec v = {iov, iovcnt, iov_total(iov, iovcnt), NULL, 0, 0};
    return input(fd, v.total, fill_vec, deliver_vec, &v, 0);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    struct vec v = {msg->msg_iov, (int)msg->msg_iovlen, iov_total(msg->msg_iov, (int)msg->msg_iovlen), msg, flags, 0};
    return input(fd, v.total, fill_vec, deliver_vec, &v,
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
