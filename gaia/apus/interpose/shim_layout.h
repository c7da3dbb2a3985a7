/* The shared segment between the interposition shim (shim.c, inside the server process) and the
 * replica daemon (segment.py). This header is the one definition of the layout: segment.py reads
 * the GAIA_* numbers below from this file, so the two sides cannot drift apart.
 *
 * All fields are little-endian and naturally aligned; words that one side waits on are 32-bit
 * futex words. Ownership: the daemon writes the header's role, max_data and beat; a slot belongs
 * to whoever its state names (the shim from FREE to SUBMITTED, the daemon from SUBMITTED to
 * DONE, the shim again until FREE); client connection entries [0, CONNS/2) are the shim's,
 * replay entries [CONNS/2, CONNS) the daemon's. The turns are a ring: the daemon appends at
 * TURN_TAIL, the shim consumes at TURN_HEAD. Execution order: the daemon numbers the inputs it
 * proposes in log order (slot.order) and sets RELEASED to the next number before a leader
 * serves; from then on the shim advances it as the server executes them.
 */
#ifndef GAIA_SHIM_LAYOUT_H
#define GAIA_SHIM_LAYOUT_H

#define GAIA_MAGIC 0x314d485341494147ULL /* "GAIASHM1" */
#define GAIA_VERSION 4
#define GAIA_SLOTS 64         /* inputs in flight at once (one per server thread is plenty) */
#define GAIA_DATA_CAP 16384   /* bytes per slot; the daemon may lower max_data to its log slot */
#define GAIA_CONNS 2048       /* connection entries: the first half clients, the second replay */
#define GAIA_TURNS 4096       /* replayed inputs announced to a backup's server, not yet read */

/* header.role */
#define GAIA_ROLE_NONE 0    /* starting, or leader not yet caught up: refuse clients */
#define GAIA_ROLE_LEADER 1  /* intercept: every input is agreed before the server sees it */
#define GAIA_ROLE_BACKUP 2  /* replay: accept only the daemon's registered replay connections */

/* slot.state */
#define GAIA_SLOT_FREE 0
#define GAIA_SLOT_CLAIMED 1    /* the shim is filling it */
#define GAIA_SLOT_SUBMITTED 2  /* ready for the daemon */
#define GAIA_SLOT_TAKEN 3      /* proposed by the daemon, waiting for commit */
#define GAIA_SLOT_DONE 4       /* result and index are set */

/* slot.kind: the APUS entry kinds the shim produces (gaia.apus.core.types.EntryKind) */
#define GAIA_KIND_CONNECT 1
#define GAIA_KIND_DATA 2
#define GAIA_KIND_CLOSE 3

/* slot.order of an input that has no place to wait for (not proposed, not a DATA input) */
#define GAIA_NO_ORDER 0xFFFFFFFF

/* slot.result */
#define GAIA_RESULT_OK 0
#define GAIA_RESULT_LOST 1  /* not committed (leadership lost, timed out): do not deliver */

/* conn.state */
#define GAIA_CONN_FREE 0
#define GAIA_CONN_CLIENT 1      /* a client connection the leader's shim intercepts */
#define GAIA_CONN_REGISTERED 2  /* the daemon is about to connect from conn.port */
#define GAIA_CONN_REPLAY 3      /* the server accepted that replay connection */

/* byte offsets */
#define GAIA_HDR_MAGIC 0      /* u64 */
#define GAIA_HDR_VERSION 8    /* u32 */
#define GAIA_HDR_ROLE 12      /* u32 */
#define GAIA_HDR_DOORBELL 16  /* u32 futex: bumped by the shim after each submit */
#define GAIA_HDR_MAX_DATA 20  /* u32 */
#define GAIA_HDR_BEAT 24      /* u64: the daemon's liveness counter */
#define GAIA_HDR_CALLS 32     /* u64: intercepted input calls that carried data */
#define GAIA_HDR_BYTES 40     /* u64: their bytes */
#define GAIA_HDR_REFUSED 48   /* u64: connections refused while not leader */
#define GAIA_HDR_LOST 56      /* u64: inputs that were not committed */
#define GAIA_HDR_PID 64       /* u32: the server process that attached */
#define GAIA_HDR_SEQ 68       /* u32: the next submission's sequence number */
#define GAIA_HDR_ROUNDS 72    /* u64: waits for agreement (a batch of inputs is one) */
#define GAIA_HDR_AHEAD 80     /* u64: inputs agreed ahead of the server's read, at epoll_wait */
#define GAIA_HDR_DISCARDED 88 /* u64: agreed bytes the server closed its connection without reading */
#define GAIA_HDR_TURN_HEAD 96  /* u32: turns the server has taken (read in full); the shim's */
#define GAIA_HDR_TURN_TAIL 100 /* u32: turns announced; the daemon's */
#define GAIA_HDR_OUT_OF_TURN 104 /* u64: replay reads refused because another connection came first */
#define GAIA_HDR_RELEASED 112 /* u32 futex: the lowest input order not yet executed; the shim's */
#define GAIA_HDR_OUT_OF_ORDER 120 /* u64: inputs delivered early, the one before still unexecuted */
#define GAIA_HDR_SIZE 128

#define GAIA_SLOT_STATE 0   /* u32 futex */
#define GAIA_SLOT_KIND 4    /* u32 */
#define GAIA_SLOT_CONN 8    /* u32: connection entry index */
#define GAIA_SLOT_LEN 12    /* u32 */
#define GAIA_SLOT_RESULT 16 /* u32 */
#define GAIA_SLOT_SEQ 20    /* u32: submission order (the log keeps it: one batch is in order) */
#define GAIA_SLOT_INDEX 24  /* u64: the log index it was committed at */
#define GAIA_SLOT_ORDER 32  /* u32: the input's place in the log's order of inputs; NO_ORDER: none */
#define GAIA_SLOT_DATA 40
#define GAIA_SLOT_SIZE (GAIA_SLOT_DATA + GAIA_DATA_CAP)

#define GAIA_CONN_STATE 0     /* u32 */
#define GAIA_CONN_PORT 4      /* u32: replay source port (REGISTERED/REPLAY) */
#define GAIA_CONN_OUT_BYTES 8 /* u64: bytes the server sent on it */
#define GAIA_CONN_OUT_CRC 16  /* u32: zlib crc32 of those bytes */
#define GAIA_CONN_ORDERED 20  /* u32: 1: a replay connection, read only in its turn; 0: free */
#define GAIA_CONN_IN_BYTES 24 /* u64: bytes the server read from it */
#define GAIA_CONN_SIZE 32

/* A turn: the next `len` bytes the server reads on replay connections come from entry `conn` */
#define GAIA_TURN_CONN 0 /* u32: connection entry */
#define GAIA_TURN_LEN 4  /* u32 */
#define GAIA_TURN_SIZE 8

#define GAIA_SLOTS_OFFSET GAIA_HDR_SIZE
#define GAIA_CONNS_OFFSET (GAIA_SLOTS_OFFSET + GAIA_SLOTS * GAIA_SLOT_SIZE)
#define GAIA_TURNS_OFFSET (GAIA_CONNS_OFFSET + GAIA_CONNS * GAIA_CONN_SIZE)
#define GAIA_SEGMENT_SIZE (GAIA_TURNS_OFFSET + GAIA_TURNS * GAIA_TURN_SIZE)

#endif
