/* gaia-relay: a delaying TCP relay, the client network netem would emulate (gaia/apps/relay.py
 * starts it and documents the behaviour). One thread, one epoll loop:
 *
 *   gaia-relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT ONE_WAY_NS MAX_BUFFER STATS_FILE
 *
 * Every accepted client gets its own connection to the target; each direction is a delay line,
 * a queue of chunks stamped on arrival and written to the other side once `arrival + delay` has
 * come, in arrival order (bytes are never reordered). An EOF travels like data: the other side
 * is shut down for writing after the same delay, behind every byte before it; a pair ends once
 * both directions have. A side is not read while its line holds more than MAX_BUFFER bytes, so
 * TCP flow control pushes back on a sender that outruns its receiver. Timers are a timerfd set
 * early by the loop's typical lateness (a running median), so chunks typically get the delay
 * asked for. Counters live in STATS_FILE (struct shared below), read live by the Python side.
 * Once listening it prints "HOST PORT" on stdout; SIGTERM or SIGINT closes everything and exits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE 65536
#define LATE_STEP_NS 2000

struct dstats { uint64_t chunks, bytes, delay_sum_ns, delay_max_ns, paused; };
struct shared { uint64_t connections, failed_connects; struct dstats to_server, to_client; };

struct chunk {
    struct chunk *next;
    int64_t arrived;
    uint32_t len, off;
    int eof;
    uint8_t data[];
};

struct pair;
struct end { struct pair *pair; int which; }; /* which: 0 the client's socket, 1 the server's */

struct line {                /* one direction */
    int *from, *to;          /* the sockets it reads and writes */
    struct chunk *head, *tail;
    size_t queued;
    int reading, ended, blocked; /* blocked: the receiver's buffer is full (wait for EPOLLOUT) */
    struct dstats *st;
};

struct pair {
    int fd[2];
    int connected, dead; /* dead: closed; freed after the events of this round */
    struct end ends[2];
    uint32_t watched[2]; /* the events each socket is registered for now */
    struct line up, down; /* up: client -> server */
    struct pair *prev, *next;
};

static int ep, tfd;
static int64_t delay_ns, lead_ns;
static size_t max_buffer;
static struct shared *stats;
static struct pair *pairs, *graveyard;
static int64_t timer_set; /* when the armed timer is due (0: disarmed) */
static uint8_t buf[READ_SIZE];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "gaia-relay: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int resolve(const char *host, const char *port, struct sockaddr_storage *out, socklen_t *len) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, port, &hints, &res) != 0) return -1;
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static void watch(int fd, uint32_t events, void *ptr, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = ptr};
    epoll_ctl(ep, op, fd, &ev);
}

/* What each socket waits for: readable while its outgoing line reads, writable while its
 * incoming line is blocked (or, for the server's socket, until the connect completes). */
static void rewatch(struct pair *p) {
    uint32_t client = (p->up.reading ? EPOLLIN : 0) | (p->down.blocked ? EPOLLOUT : 0);
    uint32_t server = p->connected ? (p->down.reading ? EPOLLIN : 0) | (p->up.blocked ? EPOLLOUT : 0)
                                   : EPOLLOUT;
    uint32_t want[2] = {client, server};
    for (int i = 0; i < 2; i++)
        if (want[i] != p->watched[i]) { /* a syscall only when the interest changes */
            watch(p->fd[i], want[i], &p->ends[i], EPOLL_CTL_MOD);
            p->watched[i] = want[i];
        }
}

static void drop_line(struct line *l) {
    while (l->head) {
        struct chunk *c = l->head;
        l->head = c->next;
        free(c);
    }
    l->tail = NULL;
}

/* Close both sockets; the pair is freed by bury() once no event of this round can name it. */
static void close_pair(struct pair *p) {
    close(p->fd[0]);
    close(p->fd[1]);
    drop_line(&p->up);
    drop_line(&p->down);
    if (p->prev) p->prev->next = p->next;
    else pairs = p->next;
    if (p->next) p->next->prev = p->prev;
    p->dead = 1;
    p->next = graveyard;
    graveyard = p;
}

static void bury(void) {
    while (graveyard) {
        struct pair *p = graveyard;
        graveyard = p->next;
        free(p);
    }
}

static void push(struct line *l, const uint8_t *data, uint32_t len, int eof) {
    struct chunk *c = malloc(sizeof *c + len);
    if (c == NULL) die("out of memory");
    c->next = NULL;
    c->arrived = now_ns();
    c->len = len;
    c->off = 0;
    c->eof = eof;
    memcpy(c->data, data, len);
    if (l->tail) l->tail->next = c;
    else l->head = c;
    l->tail = c;
    l->queued += len;
}

/* Read once from the line's sender; -1: the pair is broken. */
static int take_in(struct line *l) {
    ssize_t n = read(*l->from, buf, sizeof buf);
    if (n > 0) {
        push(l, buf, (uint32_t)n, 0);
        if (l->queued > max_buffer) {
            l->reading = 0;
            l->st->paused++;
        }
    } else if (n == 0) {
        push(l, NULL, 0, 1);
        l->reading = 0;
    } else if (errno != EAGAIN && errno != EINTR) {
        return -1;
    }
    return 0;
}

/* Write every chunk that is due; -1: the pair is broken. */
static int give_out(struct line *l, int64_t now) {
    l->blocked = 0;
    while (l->head && l->head->arrived + delay_ns - lead_ns <= now) {
        struct chunk *c = l->head;
        if (c->eof) {
            shutdown(*l->to, SHUT_WR);
            l->ended = 1;
        } else {
            ssize_t n = send(*l->to, c->data + c->off, c->len - c->off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) {
                    l->blocked = 1;
                    return 0;
                }
                return -1;
            }
            c->off += (uint32_t)n;
            if (c->off < c->len) {
                l->blocked = 1;
                return 0;
            }
            int64_t took = now_ns() - c->arrived;
            l->st->chunks++;
            l->st->bytes += c->len;
            l->st->delay_sum_ns += (uint64_t)took;
            if ((uint64_t)took > l->st->delay_max_ns) l->st->delay_max_ns = (uint64_t)took;
            l->queued -= c->len;
        }
        l->head = c->next;
        if (l->head == NULL) l->tail = NULL;
        free(c);
    }
    if (!l->reading && !l->ended && l->queued <= max_buffer && !(l->tail && l->tail->eof)) l->reading = 1;
    return 0;
}

static void accept_client(int listener, const struct sockaddr_storage *target, socklen_t tlen) {
    int c = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c < 0) return;
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    stats->connections++;
    int s = socket(target->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0 || (connect(s, (const struct sockaddr *)target, tlen) < 0 && errno != EINPROGRESS)) {
        stats->failed_connects++;
        if (s >= 0) close(s);
        close(c);
        return;
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct pair *p = calloc(1, sizeof *p);
    if (p == NULL) die("out of memory");
    p->fd[0] = c;
    p->fd[1] = s;
    for (int i = 0; i < 2; i++) p->ends[i] = (struct end){p, i};
    p->up = (struct line){.from = &p->fd[0], .to = &p->fd[1], .reading = 1, .st = &stats->to_server};
    p->down = (struct line){.from = &p->fd[1], .to = &p->fd[0], .reading = 1, .st = &stats->to_client};
    p->next = pairs;
    if (pairs) pairs->prev = p;
    pairs = p;
    watch(c, 0, &p->ends[0], EPOLL_CTL_ADD);
    watch(s, 0, &p->ends[1], EPOLL_CTL_ADD);
    rewatch(p);
}

/* A socket of a pair is ready: connect completion, data in, or room to write. */
static void serve(struct end *e, uint32_t events, int64_t now) {
    struct pair *p = e->pair;
    if (p->dead) return;
    if (e->which == 1 && !p->connected) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(p->fd[1], SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            stats->failed_connects++;
            close_pair(p);
            return;
        }
        p->connected = 1;
    }
    struct line *out = e->which == 0 ? &p->up : &p->down;  /* read from this socket */
    struct line *in = e->which == 0 ? &p->down : &p->up;   /* written to this socket */
    int broken = 0;
    if (events & EPOLLERR) broken = 1; /* reset: both directions are gone */
    else if ((events & (EPOLLIN | EPOLLHUP)) && out->reading) broken |= take_in(out);
    if (p->connected && (events & EPOLLOUT)) broken |= give_out(in, now);
    if (p->connected) broken |= give_out(out, now);
    if (broken || (p->up.ended && p->down.ended)) close_pair(p);
    else rewatch(p);
}

/* Deliver what fell due everywhere, then arm the timer for the next chunk. */
static void tick(int64_t now) {
    int64_t next = INT64_MAX;
    for (struct pair *p = pairs, *after; p; p = after) {
        after = p->next;
        if (!p->connected) continue;
        if (give_out(&p->up, now) < 0 || give_out(&p->down, now) < 0 || (p->up.ended && p->down.ended)) {
            close_pair(p);
            continue;
        }
        rewatch(p);
        for (struct line *l = &p->up; l; l = l == &p->up ? &p->down : NULL)
            if (l->head && !l->blocked && l->head->arrived + delay_ns - lead_ns < next)
                next = l->head->arrived + delay_ns - lead_ns;
    }
    struct itimerspec t = {0};
    timer_set = 0;
    if (next != INT64_MAX) {
        if (next <= now) next = now + 1000;
        t.it_value.tv_sec = next / 1000000000LL;
        t.it_value.tv_nsec = next % 1000000000LL;
        timer_set = next;
    }
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &t, NULL);
}

/* The timer fired `late_ns` after it was due: track the typical lateness (never more than half
 * the delay), to set the next timers that much early. */
static void observe(int64_t late_ns) {
    if (late_ns > lead_ns) lead_ns += LATE_STEP_NS;
    else if (lead_ns >= LATE_STEP_NS) lead_ns -= LATE_STEP_NS;
    if (lead_ns > delay_ns / 2) lead_ns = delay_ns / 2;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: gaia-relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT ONE_WAY_NS MAX_BUFFER STATS_FILE\n");
        return 2;
    }
    delay_ns = atoll(argv[5]);
    max_buffer = (size_t)atoll(argv[6]);
    int sfd = open(argv[7], O_RDWR | O_CLOEXEC);
    if (sfd < 0) die("cannot open the stats file");
    stats = mmap(NULL, sizeof *stats, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (stats == MAP_FAILED) die("cannot map the stats file");
    close(sfd);

    struct sockaddr_storage laddr, taddr;
    socklen_t llen, tlen;
    if (resolve(argv[1], argv[2], &laddr, &llen) < 0 || resolve(argv[3], argv[4], &taddr, &tlen) < 0) {
        errno = EINVAL;
        die("cannot resolve an address");
    }
    int listener = socket(laddr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (listener < 0 || bind(listener, (struct sockaddr *)&laddr, llen) < 0 || listen(listener, 256) < 0)
        die("could not listen");
    struct sockaddr_storage bound;
    socklen_t blen = sizeof bound;
    getsockname(listener, (struct sockaddr *)&bound, &blen);
    char host[INET6_ADDRSTRLEN];
    int port;
    if (bound.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&bound)->sin6_addr, host, sizeof host);
        port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    } else {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&bound)->sin_addr, host, sizeof host);
        port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    }

    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* 1 µs, not Linux's default 50 µs */
    setpriority(PRIO_PROCESS, 0, -10);          /* only root may: elsewhere it stays */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sigfd = signalfd(-1, &mask, SFD_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (sigfd < 0 || ep < 0 || tfd < 0) die("cannot set up the loop");
    static int tags[3];
    watch(listener, EPOLLIN, &tags[0], EPOLL_CTL_ADD);
    watch(tfd, EPOLLIN, &tags[1], EPOLL_CTL_ADD);
    watch(sigfd, EPOLLIN, &tags[2], EPOLL_CTL_ADD);
    printf("%s %d\n", host, port);
    fflush(stdout);

    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        int64_t now = now_ns();
        for (int i = 0; i < n; i++) {
            void *ptr = evs[i].data.ptr;
            if (ptr == &tags[0]) {
                accept_client(listener, &taddr, tlen);
            } else if (ptr == &tags[1]) {
                uint64_t fired;
                if (read(tfd, &fired, sizeof fired) > 0 && timer_set) observe(now - timer_set);
            } else if (ptr == &tags[2]) {
                while (pairs) close_pair(pairs);
                bury();
                close(listener);
                return 0;
            } else {
                serve(ptr, evs[i].events, now);
            }
        }
        bury();
        tick(now_ns());
        bury();
    }
}
