/* A blkif test frontend for the simulated hypervisor of `vhd serve IMAGE --sim DIR`.
 *
 * It plays a PV guest: guest memory is DIR/memory (grant reference = page index, grant flags in
 * DIR/grants), event channels are connections to DIR/evtchn.sock, and the xenbus handshake goes
 * through libxenstore (xs_open honours XENSTORED_PATH) against the test xenstored.  Rings and
 * requests are built with Xen's own DEFINE_RING_TYPES / RING_* macros and blkif_request_t
 * layouts (blkif_abi.h; -DBLKIF_X86_32 builds the x86_32-abi flavour).
 *
 *   frontend DIR FRONTEND_PATH check [--shadow FILE] [--read-only] [--resize]
 *       runs the blkif conformance checklist (items printed as "ok N ...") and writes
 *       the guest's view of the whole disk to FILE for comparison with the image.
 *   frontend DIR FRONTEND_PATH bench --order N --op read|write --segs N --depth N --seconds S
 *       [--random] prints one JSON line {"iops":..., "mbps":...}.
 *
 * Exit status 0 only if every check passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <xenstore.h>

#include "blkif_abi.h"

#define PAGE 4096
#define RING_PAGES_MAX 16
#define RING_BASE 0         /* pages 0..15: the main ring */
#define RING2_BASE 16       /* pages 16..31: a second queue */
#define BAD_PAGE 40         /* never granted */
#define RO_PAGE 41          /* granted read-only */
#define INDIRECT_BASE 48    /* indirect descriptor pages: 8 per slot, up to 64 slots */
#define DATA_BASE 1024      /* data pages */

static const char *progname = "frontend";
static int failures;

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: FAIL: ", progname);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    failures++;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: fatal: ", progname);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

#define CHECK(cond, ...) do { if (!(cond)) fail(__VA_ARGS__); } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng_state = 88172645463325252ULL;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* ---- the simulated hypervisor -------------------------------------------------------------- */

struct fe {
    const char *dir;
    struct xs_handle *xs;
    char fe_path[256], be_path[256];
    uint8_t *mem;
    uint8_t *grants;
    size_t npages;
    int evfd;
    uint32_t port;
    int order;
    unsigned ring_base;
    blkif_sring_t *sring;
    blkif_front_ring_t ring;
    uint64_t sectors;
    unsigned info;
    unsigned max_indirect, max_order, max_queues;
    bool discard;
    uint8_t *shadow;
    unsigned long notifications;
};

static uint8_t *page(struct fe *f, unsigned p) { return f->mem + (size_t)p * PAGE; }
static void grant(struct fe *f, unsigned p, bool ro) { f->grants[p] = ro ? 2 : 1; }
static void ungrant(struct fe *f, unsigned p) { f->grants[p] = 0; }

static void *map_file(const char *dir, const char *name, size_t *size) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR);
    if (fd < 0) die("open %s: %s", path, strerror(errno));
    struct stat st;
    fstat(fd, &st);
    void *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die("mmap %s: %s", path, strerror(errno));
    close(fd);
    *size = st.st_size;
    return p;
}

/* EVTCHNOP_alloc_unbound: a connection to the hypervisor's event socket; it tells us the port. */
static int alloc_port(struct fe *f, uint32_t *port) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s/evtchn.sock", f->dir);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect evtchn: %s", strerror(errno));
    size_t got = 0;
    while (got < 4) {
        ssize_t n = read(s, (char *)port + got, 4 - got);
        if (n <= 0) die("evtchn port: %s", strerror(errno));
        got += n;
    }
    fcntl(s, F_SETFL, O_NONBLOCK);
    return s;
}

static void kick(int fd) {
    char b = 1;
    if (write(fd, &b, 1) < 0 && errno != EAGAIN) fail("notify: %s", strerror(errno));
}

/* Wait up to ms for a notification; returns true if one (or more) came. */
static bool wait_event(struct fe *f, int ms) {
    struct pollfd p = {.fd = f->evfd, .events = POLLIN};
    if (poll(&p, 1, ms) <= 0) return false;
    char buf[4096];
    ssize_t n = read(f->evfd, buf, sizeof buf);
    if (n > 0) f->notifications++;
    return n > 0;
}

/* ---- xenstore -------------------------------------------------------------------------------- */

static char *xs_get(struct fe *f, const char *dir, const char *key) {
    char path[512];
    unsigned len;
    snprintf(path, sizeof path, "%s/%s", dir, key);
    return xs_read(f->xs, XBT_NULL, path, &len);
}

static long xs_get_long(struct fe *f, const char *dir, const char *key, long dflt) {
    char *v = xs_get(f, dir, key);
    if (!v) return dflt;
    long r = strtol(v, NULL, 10);
    free(v);
    return r;
}

static void xs_put(struct fe *f, xs_transaction_t t, const char *key, const char *fmt, ...) {
    char path[512], val[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(val, sizeof val, fmt, ap);
    va_end(ap);
    snprintf(path, sizeof path, "%s/%s", f->fe_path, key);
    if (!xs_write(f->xs, t, path, val, strlen(val))) die("xs_write %s: %s", path, strerror(errno));
}

static void xs_del(struct fe *f, const char *key) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", f->fe_path, key);
    xs_rm(f->xs, XBT_NULL, path);
}

static int be_state(struct fe *f) { return (int)xs_get_long(f, f->be_path, "state", -1); }

static bool wait_be_state(struct fe *f, int want, int ms) {
    double end = now() + ms / 1000.0;
    while (now() < end) {
        if (be_state(f) == want) return true;
        usleep(500);
    }
    return be_state(f) == want;
}

static void set_state(struct fe *f, int state) { xs_put(f, XBT_NULL, "state", "%d", state); }

/* ---- ring set-up and the handshake ------------------------------------------------------------ */

static void ring_init(struct fe *f, unsigned base, int order) {
    f->order = order;
    f->ring_base = base;
    f->sring = (blkif_sring_t *)page(f, base);
    memset(f->sring, 0, (size_t)PAGE << order);
    for (unsigned i = 0; i < (1u << order); i++) grant(f, base + i, false);
    SHARED_RING_INIT(f->sring);
    FRONT_RING_INIT(&f->ring, f->sring, (size_t)PAGE << order);
}

static void write_ring_keys(struct fe *f, xs_transaction_t t, const char *prefix, unsigned base,
                            int order, uint32_t port) {
    char key[64];
    if (order == 0) {
        snprintf(key, sizeof key, "%sring-ref", prefix);
        xs_put(f, t, key, "%u", base);
    } else {
        for (unsigned i = 0; i < (1u << order); i++) {
            snprintf(key, sizeof key, "%sring-ref%u", prefix, i);
            xs_put(f, t, key, "%u", base + i);
        }
    }
    snprintf(key, sizeof key, "%sevent-channel", prefix);
    xs_put(f, t, key, "%u", port);
}

static void clear_keys(struct fe *f) {
    static const char *keys[] = {"ring-ref", "ring-page-order", "event-channel", "protocol",
                                 "multi-queue-num-queues", "queue-0", "queue-1", "feature-persistent",
                                 "num-ring-pages", "max-requests", NULL};
    for (int i = 0; keys[i]; i++) xs_del(f, keys[i]);
    for (int i = 0; i < RING_PAGES_MAX; i++) {
        char k[32];
        snprintf(k, sizeof k, "ring-ref%d", i);
        xs_del(f, k);
    }
}

/* Linux blkfront's talk_to_blkback + blkfront_connect.  Returns false if the backend refused. */
static bool connect_device_bad(struct fe *f, int order, bool expect_ok, const char *bad_key,
                               const char *bad_val) {
    if (!wait_be_state(f, XenbusStateInitWait, 5000)) die("backend never reached InitWait");
    f->max_order = xs_get_long(f, f->be_path, "max-ring-page-order", 0);
    f->max_indirect = xs_get_long(f, f->be_path, "feature-max-indirect-segments", 0);
    f->max_queues = xs_get_long(f, f->be_path, "multi-queue-max-queues", 1);
    ring_init(f, RING_BASE, order);
    if (f->evfd >= 0) close(f->evfd);
    f->evfd = alloc_port(f, &f->port);
    clear_keys(f);
    xs_transaction_t t;
    do {
        t = xs_transaction_start(f->xs);
        if (order) xs_put(f, t, "ring-page-order", "%d", order);
        write_ring_keys(f, t, "", RING_BASE, order, f->port);
        xs_put(f, t, "protocol", "%s", BLKIF_PROTOCOL);
        xs_put(f, t, "feature-persistent", "0");
        /* FreeBSD-style legacy keys must be tolerated. */
        xs_put(f, t, "max-requests", "%u", RING_SIZE(&f->ring));
        if (bad_key) xs_put(f, t, bad_key, "%s", bad_val);
    } while (!xs_transaction_end(f->xs, t, false) && errno == EAGAIN);
    /* Item 2: the backend must not connect before we say Initialised. */
    usleep(20000);
    CHECK(be_state(f) == XenbusStateInitWait, "backend left InitWait before frontend state 3");
    set_state(f, XenbusStateInitialised);
    if (!expect_ok) return false;
    if (!wait_be_state(f, XenbusStateConnected, 5000)) {
        fail("backend did not connect (state %d)", be_state(f));
        return false;
    }
    f->sectors = xs_get_long(f, f->be_path, "sectors", 0);
    f->info = xs_get_long(f, f->be_path, "info", -1);
    f->discard = xs_get_long(f, f->be_path, "feature-discard", 0) == 1;
    set_state(f, XenbusStateConnected);
    return true;
}

static bool connect_device(struct fe *f, int order, bool expect_ok) {
    return connect_device_bad(f, order, expect_ok, NULL, NULL);
}

static void close_device(struct fe *f) {
    set_state(f, XenbusStateClosing);
    CHECK(wait_be_state(f, XenbusStateClosing, 5000), "backend did not follow to Closing");
    set_state(f, XenbusStateClosed);
    CHECK(wait_be_state(f, XenbusStateClosed, 10000), "backend did not reach Closed");
}

static void reopen_device(struct fe *f) {
    set_state(f, XenbusStateInitialising);
    CHECK(wait_be_state(f, XenbusStateInitWait, 5000), "backend did not go back to InitWait");
}

/* ---- requests ---------------------------------------------------------------------------------- */

struct resp { uint64_t id; uint8_t op; int16_t status; };

static blkif_request_t *next_req(struct fe *f) {
    blkif_request_t *r = RING_GET_REQUEST(&f->ring, f->ring.req_prod_pvt);
    memset(r, 0, sizeof *r);
    f->ring.req_prod_pvt++;
    return r;
}

static void push(struct fe *f) {
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->ring, notify);
    if (notify) kick(f->evfd);
}

/* Collect up to max responses, waiting up to ms; checks padding (XSA-216).  Returns early once
 * at least `enough` responses are in and no more are pending. */
static int collect_some(struct fe *f, struct resp *out, int max, int enough, int ms);
static int collect(struct fe *f, struct resp *out, int max, int ms) {
    return collect_some(f, out, max, max, ms);
}

static int collect_some(struct fe *f, struct resp *out, int max, int enough, int ms) {
    int n = 0;
    double end = now() + ms / 1000.0;
    while (n < max) {
        RING_IDX rp = f->sring->rsp_prod;
        xen_rmb();
        if (rp - f->ring.rsp_cons > RING_SIZE(&f->ring)) {
            fail("backend overran the response ring");
            return n;
        }
        while (f->ring.rsp_cons != rp && n < max) {
            blkif_response_t *r = RING_GET_RESPONSE(&f->ring, f->ring.rsp_cons);
            const uint8_t *raw = (const uint8_t *)r;
            CHECK(raw[9] == 0, "response padding byte 9 is %u", raw[9]);
            for (size_t i = 12; i < sizeof *r; i++) CHECK(raw[i] == 0, "response padding byte %zu", i);
            out[n].id = r->id;
            out[n].op = r->operation;
            out[n].status = r->status;
            n++;
            f->ring.rsp_cons++;
        }
        if (n >= max) break;
        int more;
        if (n >= enough && f->sring->rsp_prod == f->ring.rsp_cons) break;
        RING_FINAL_CHECK_FOR_RESPONSES(&f->ring, more);
        if (more) continue;
        double left = end - now();
        if (left <= 0) break;
        wait_event(f, (int)(left * 1000) + 1);
    }
    return n;
}

static int16_t call(struct fe *f, uint64_t id, uint8_t want_op) {
    push(f);
    struct resp r;
    if (collect(f, &r, 1, 10000) != 1) {
        fail("no response for request %" PRIu64, id);
        return 99;
    }
    CHECK(r.id == id, "response id %" PRIu64 " for request %" PRIu64, r.id, id);
    CHECK(r.op == want_op, "response op %u, want %u (id %" PRIu64 ")", r.op, want_op, id);
    return r.status;
}

static uint64_t next_id = 1;

/* READ/WRITE of n segments [first,last] of data pages starting at `pg`. */
static blkif_request_t *rw(struct fe *f, uint8_t op, uint64_t sector, unsigned n, unsigned pg,
                           unsigned first, unsigned last) {
    blkif_request_t *r = next_req(f);
    r->operation = op;
    r->nr_segments = n;
    r->handle = 0;
    r->id = next_id++;
    r->sector_number = sector;
    for (unsigned i = 0; i < n && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        r->seg[i].gref = pg + i;
        r->seg[i].first_sect = first;
        r->seg[i].last_sect = last;
    }
    return r;
}

static void fill_random(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, n - i < 8 ? n - i : 8);
    }
}

/* Write then read back segments; keep the shadow and compare. */
static void roundtrip(struct fe *f, uint64_t sector, unsigned n, unsigned first, unsigned last) {
    size_t seglen = (size_t)(last - first + 1) * 512;
    uint64_t off = sector * 512;
    for (unsigned i = 0; i < n; i++) {
        grant(f, DATA_BASE + i, false);
        fill_random(page(f, DATA_BASE + i) + first * 512, seglen);
        memcpy(f->shadow + off + i * seglen, page(f, DATA_BASE + i) + first * 512, seglen);
    }
    blkif_request_t *r = rw(f, BLKIF_OP_WRITE, sector, n, DATA_BASE, first, last);
    CHECK(call(f, r->id, BLKIF_OP_WRITE) == BLKIF_RSP_OKAY, "write n=%u [%u,%u]", n, first, last);
    for (unsigned i = 0; i < n; i++) memset(page(f, DATA_BASE + i), 0xEE, PAGE);
    r = rw(f, BLKIF_OP_READ, sector, n, DATA_BASE, first, last);
    CHECK(call(f, r->id, BLKIF_OP_READ) == BLKIF_RSP_OKAY, "read n=%u [%u,%u]", n, first, last);
    for (unsigned i = 0; i < n; i++) {
        CHECK(memcmp(page(f, DATA_BASE + i) + first * 512, f->shadow + off + i * seglen, seglen) == 0,
              "read back differs: sector %" PRIu64 " seg %u [%u,%u]", sector, i, first, last);
        /* Bytes outside [first,last] must not have been touched. */
        if (first) CHECK(page(f, DATA_BASE + i)[first * 512 - 1] == 0xEE, "wrote before first_sect");
        if (last < 7) CHECK(page(f, DATA_BASE + i)[(last + 1) * 512] == 0xEE, "wrote after last_sect");
    }
}

/* INDIRECT request of n full-page segments from data page `pg`, descriptors at `ipg`. */
static blkif_request_t *indirect(struct fe *f, uint8_t op, uint64_t sector, unsigned n, unsigned pg,
                                 unsigned ipg) {
    unsigned pages = (n + 511) / 512;
    for (unsigned i = 0; i < pages; i++) grant(f, ipg + i, true);
    struct blkif_request_segment *segs = (struct blkif_request_segment *)page(f, ipg);
    for (unsigned i = 0; i < n; i++) {
        segs[i].gref = pg + i;
        segs[i].first_sect = 0;
        segs[i].last_sect = 7;
    }
    blkif_request_t *r = next_req(f);
    blkif_request_indirect_t *in = (blkif_request_indirect_t *)r;
    in->operation = BLKIF_OP_INDIRECT;
    in->indirect_op = op;
    in->nr_segments = n;
    in->id = next_id++;
    in->sector_number = sector;
    for (unsigned i = 0; i < pages && i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
        in->indirect_grefs[i] = ipg + i;
    return r;
}

/* Read the whole disk into the shadow (with indirect 1 MiB requests when offered). */
static void read_all(struct fe *f, uint8_t *dst) {
    unsigned per = f->max_indirect >= 256 ? 256 : BLKIF_MAX_SEGMENTS_PER_REQUEST;
    for (unsigned i = 0; i < per; i++) grant(f, DATA_BASE + i, false);
    for (uint64_t s = 0; s < f->sectors;) {
        unsigned n = per;
        if ((f->sectors - s) / 8 < n) n = (f->sectors - s) / 8;
        if (n == 0) break;
        blkif_request_t *r;
        if (per > BLKIF_MAX_SEGMENTS_PER_REQUEST) r = indirect(f, BLKIF_OP_READ, s, n, DATA_BASE, INDIRECT_BASE);
        else r = rw(f, BLKIF_OP_READ, s, n, DATA_BASE, 0, 7);
        if (call(f, r->id, BLKIF_OP_READ) != BLKIF_RSP_OKAY) die("initial read at %" PRIu64, s);
        memcpy(dst + s * 512, page(f, DATA_BASE), (size_t)n * PAGE);
        s += n * 8;
    }
}

static uint8_t ok_op(blkif_request_t *r) { return r->operation; }

/* ---- the checklist ------------------------------------------------------------------------------- */

static void item(int n, const char *what) { printf("ok %d %s\n", n, what); fflush(stdout); }

static void check_geometry(void) {
    int before = failures;
    for (int order = 0; order <= 4; order++)
        CHECK(__CONST_RING_SIZE(blkif, PAGE << order) == 32u << order, "ring size at order %d", order);
    CHECK(offsetof(blkif_response_t, operation) == 8 && offsetof(blkif_response_t, status) == 10,
          "response offsets");
    if (failures == before) item(1, "ring geometry (Xen macros: 32 << order; response offsets 0/8/10)");
}

static void check_bad_connects(struct fe *f) {
    int before = failures;
    struct { const char *key, *val; } bad[] = {
        {"ring-page-order", "9"}, {"protocol", "sparc-abi"}, {"multi-queue-num-queues", "0"},
        {"multi-queue-num-queues", "99"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        connect_device_bad(f, 0, false, bad[i].key, bad[i].val);
        CHECK(wait_be_state(f, XenbusStateClosing, 5000) || be_state(f) == XenbusStateClosed,
              "backend accepted bad %s=%s (state %d)", bad[i].key, bad[i].val, be_state(f));
        char *err = xs_get(f, f->be_path, "error");
        CHECK(err != NULL, "no error node for bad %s", bad[i].key);
        free(err);
        set_state(f, XenbusStateClosed);
        CHECK(wait_be_state(f, XenbusStateClosed, 5000), "backend not Closed after refusal");
        clear_keys(f);
        reopen_device(f);
    }
    /* Multi-queue layout: two queues of queue-N/ keys, I/O on both. */
    ring_init(f, RING_BASE, 0);
    blkif_sring_t *s2 = (blkif_sring_t *)page(f, RING2_BASE);
    memset(s2, 0, PAGE);
    grant(f, RING2_BASE, false);
    SHARED_RING_INIT(s2);
    blkif_front_ring_t r2;
    FRONT_RING_INIT(&r2, s2, PAGE);
    if (f->evfd >= 0) close(f->evfd);
    f->evfd = alloc_port(f, &f->port);
    uint32_t port2;
    int ev2 = alloc_port(f, &port2);
    clear_keys(f);
    xs_put(f, XBT_NULL, "multi-queue-num-queues", "2");
    xs_put(f, XBT_NULL, "protocol", "%s", BLKIF_PROTOCOL);
    write_ring_keys(f, XBT_NULL, "queue-0/", RING_BASE, 0, f->port);
    write_ring_keys(f, XBT_NULL, "queue-1/", RING2_BASE, 0, port2);
    set_state(f, XenbusStateInitialised);
    CHECK(wait_be_state(f, XenbusStateConnected, 5000), "multi-queue connect");
    set_state(f, XenbusStateConnected);
    grant(f, DATA_BASE, false);
    blkif_request_t *r = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    CHECK(call(f, r->id, BLKIF_OP_READ) == BLKIF_RSP_OKAY, "read on queue 0");
    blkif_request_t *q = RING_GET_REQUEST(&r2, r2.req_prod_pvt);
    memset(q, 0, sizeof *q);
    q->operation = BLKIF_OP_READ;
    q->nr_segments = 1;
    q->id = 4242;
    q->seg[0].gref = DATA_BASE;
    q->seg[0].last_sect = 7;
    r2.req_prod_pvt++;
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&r2, notify);
    if (notify) kick(ev2);
    double end = now() + 5;
    while (s2->rsp_prod == 0 && now() < end) usleep(200);
    CHECK(s2->rsp_prod == 1 && RING_GET_RESPONSE(&r2, 0)->id == 4242 &&
          RING_GET_RESPONSE(&r2, 0)->status == BLKIF_RSP_OKAY, "read on queue 1");
    close_device(f);
    close(ev2);
    clear_keys(f);
    reopen_device(f);
    if (failures == before) item(3, "bad order/queues/protocol refused (error node, Closing); multi-queue and single-queue keys work");
}

static void check_handshake(struct fe *f, bool read_only) {
    int before = failures;
    static const char *keys[] = {"sectors", "info", "sector-size", "physical-sector-size",
                                 "feature-flush-cache", "feature-barrier", "feature-discard",
                                 "feature-persistent", "hotplug-status", "max-ring-page-order",
                                 "feature-max-indirect-segments", "multi-queue-max-queues", NULL};
    for (int i = 0; keys[i]; i++) {
        char *v = xs_get(f, f->be_path, keys[i]);
        CHECK(v != NULL, "backend key %s missing", keys[i]);
        free(v);
    }
    CHECK(xs_get_long(f, f->be_path, "sector-size", 0) == 512, "sector-size is not 512");
    CHECK(xs_get_long(f, f->be_path, "feature-persistent", 1) == 0, "feature-persistent offered");
    CHECK(f->max_order == 4, "max-ring-page-order %u", f->max_order);
    CHECK(!!(f->info & VDISK_READONLY) == read_only, "info %u vs mode", f->info);
    if (failures == before) item(2, "handshake: InitWait keys, Connected only after 3, all device keys");
}

static void check_rw(struct fe *f) {
    int before = failures;
    uint64_t limit = f->sectors - 11 * 8;
    for (unsigned first = 0; first < 8; first++)
        for (unsigned last = first; last < 8; last++)
            for (unsigned n = 1; n <= 11; n++)
                roundtrip(f, (rnd() % (limit / 8)) * 8 + (rnd() % 8), n, first, last);
    if (failures == before) item(4, "READ/WRITE round trip: every first/last pair x 1..11 segments");
}

static void expect(struct fe *f, blkif_request_t *r, int16_t want, const char *what) {
    uint64_t id = r->id;
    uint8_t op = ok_op(r) == BLKIF_OP_INDIRECT ? ((blkif_request_indirect_t *)r)->indirect_op : r->operation;
    int16_t got = call(f, id, op);
    CHECK(got == want, "%s: status %d, want %d", what, got, want);
}

static void check_errors(struct fe *f, bool read_only) {
    int before = failures;
    grant(f, DATA_BASE, false);
    grant(f, RO_PAGE, true);
    ungrant(f, BAD_PAGE);
    blkif_request_t *r;
    r = rw(f, BLKIF_OP_READ, 0, 0, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "0 segments");
    r = rw(f, BLKIF_OP_READ, 0, 11, DATA_BASE, 0, 7); r->nr_segments = 12; expect(f, r, BLKIF_RSP_ERROR, "12 segments");
    r = rw(f, BLKIF_OP_READ, 0, 11, DATA_BASE, 0, 7); r->nr_segments = 255; expect(f, r, BLKIF_RSP_ERROR, "255 segments");
    r = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 8); expect(f, r, BLKIF_RSP_ERROR, "last_sect 8");
    r = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 5, 4); expect(f, r, BLKIF_RSP_ERROR, "first > last");
    r = rw(f, BLKIF_OP_READ, f->sectors - 7, 1, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "end > sectors");
    r = rw(f, BLKIF_OP_READ, f->sectors - 8, 1, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_OKAY, "last 8 sectors");
    r = rw(f, BLKIF_OP_READ, UINT64_MAX - 3, 1, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "u64 wrap");
    r = rw(f, BLKIF_OP_READ, 0, 1, BAD_PAGE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "ungranted gref");
    r = rw(f, BLKIF_OP_READ, 0, 1, 0xFFFFFFF0u, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "gref out of range");
    r = rw(f, BLKIF_OP_READ, 0, 1, RO_PAGE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "read into read-only grant");
    /* One bad segment among good ones: the whole request fails and nothing is written. */
    r = rw(f, BLKIF_OP_READ, 0, 3, DATA_BASE, 0, 7); r->seg[2].gref = BAD_PAGE;
    expect(f, r, BLKIF_RSP_ERROR, "bad gref in segment 3");
    if (read_only) {
        r = rw(f, BLKIF_OP_WRITE, 0, 1, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "write on mode=r");
        r = rw(f, BLKIF_OP_FLUSH_DISKCACHE, 0, 0, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "flush on mode=r");
        r = rw(f, BLKIF_OP_WRITE_BARRIER, 0, 0, DATA_BASE, 0, 7); expect(f, r, BLKIF_RSP_ERROR, "barrier on mode=r");
        blkif_request_discard_t *d = (blkif_request_discard_t *)next_req(f);
        d->operation = BLKIF_OP_DISCARD; d->id = next_id++; d->sector_number = 0; d->nr_sectors = 8;
        expect(f, (blkif_request_t *)d, BLKIF_RSP_ERROR, "discard on mode=r");
    } else {
        r = rw(f, BLKIF_OP_WRITE, 0, 1, RO_PAGE, 0, 7);
        memcpy(f->shadow, page(f, RO_PAGE), PAGE);
        expect(f, r, BLKIF_RSP_OKAY, "write from a read-only grant");
    }
    if (failures == before) item(5, "ERROR for bad segment counts/sectors, end, wrap, bad/ro grants, writes on mode=r");
}

static void check_unsupported(struct fe *f) {
    int before = failures;
    grant(f, DATA_BASE, false);
    for (unsigned op = 4; op < 256; op++) {
        if (op == 5 || op == 6) continue;
        blkif_request_t *r = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
        r->operation = op;
        uint64_t id = r->id;
        int16_t st = call(f, id, op);
        CHECK(st == BLKIF_RSP_EOPNOTSUPP, "op %u: status %d", op, st);
    }
    if (failures == before) item(6, "EOPNOTSUPP for ops 4 and 7..255, id and op echoed");
}

static void check_flush_barrier(struct fe *f) {
    int before = failures;
    blkif_request_t *r = rw(f, BLKIF_OP_FLUSH_DISKCACHE, 0, 0, DATA_BASE, 0, 7);
    expect(f, r, BLKIF_RSP_OKAY, "empty flush");
    uint64_t sector = 64;
    grant(f, DATA_BASE, false);
    fill_random(page(f, DATA_BASE), PAGE);
    memcpy(f->shadow + sector * 512, page(f, DATA_BASE), PAGE);
    r = rw(f, BLKIF_OP_FLUSH_DISKCACHE, sector, 1, DATA_BASE, 0, 7);
    expect(f, r, BLKIF_RSP_OKAY, "flush with data");
    /* Barrier: several writes, then a barrier carrying data, in one push.  Every earlier write
     * must be answered before the barrier. */
    unsigned nw = 8;
    uint64_t ids[9];
    for (unsigned i = 0; i < nw; i++) {
        grant(f, DATA_BASE + 16 + i, false);
        fill_random(page(f, DATA_BASE + 16 + i), PAGE);
        memcpy(f->shadow + (1024 + i * 8) * 512, page(f, DATA_BASE + 16 + i), PAGE);
        ids[i] = rw(f, BLKIF_OP_WRITE, 1024 + i * 8, 1, DATA_BASE + 16 + i, 0, 7)->id;
    }
    grant(f, DATA_BASE + 30, false);
    fill_random(page(f, DATA_BASE + 30), PAGE);
    memcpy(f->shadow + 2048 * 512, page(f, DATA_BASE + 30), PAGE);
    ids[nw] = rw(f, BLKIF_OP_WRITE_BARRIER, 2048, 1, DATA_BASE + 30, 0, 7)->id;
    push(f);
    struct resp rs[9];
    int got = collect(f, rs, nw + 1, 10000);
    CHECK(got == (int)nw + 1, "barrier batch: %d responses", got);
    for (int i = 0; i < got; i++) CHECK(rs[i].status == BLKIF_RSP_OKAY, "barrier batch status");
    CHECK(got > 0 && rs[got - 1].id == ids[nw] && rs[got - 1].op == BLKIF_OP_WRITE_BARRIER,
          "barrier answered before earlier writes");
    if (failures == before) item(7, "FLUSH empty and with data; BARRIER after all earlier writes");
}

static void check_discard(struct fe *f) {
    int before = failures;
    CHECK(f->discard, "feature-discard not offered");
    CHECK(xs_get_long(f, f->be_path, "discard-secure", 0) == 0, "discard-secure offered");
    blkif_request_discard_t *d = (blkif_request_discard_t *)next_req(f);
    d->operation = BLKIF_OP_DISCARD; d->id = next_id++; d->sector_number = 4096; d->nr_sectors = 4096;
    expect(f, (blkif_request_t *)d, BLKIF_RSP_OKAY, "discard in range");
    d = (blkif_request_discard_t *)next_req(f);
    d->operation = BLKIF_OP_DISCARD; d->id = next_id++; d->sector_number = f->sectors - 8; d->nr_sectors = 16;
    expect(f, (blkif_request_t *)d, BLKIF_RSP_ERROR, "discard past the end");
    d = (blkif_request_discard_t *)next_req(f);
    d->operation = BLKIF_OP_DISCARD; d->id = next_id++; d->sector_number = 0; d->nr_sectors = 8;
    d->flag = BLKIF_DISCARD_SECURE;
    expect(f, (blkif_request_t *)d, BLKIF_RSP_ERROR, "secure discard not advertised");
    /* A discarded range's contents are unspecified (blkif: the region "may be discarded at any
     * time without impact to the client"; a differencing image shows its parent there again):
     * read it back into the shadow, which the final read-back then holds the backend to. */
    for (unsigned i = 0; i < 11; i++) grant(f, DATA_BASE + i, false);
    for (uint64_t s = 4096; s < 8192; s += 88) {
        unsigned n = 8192 - s < 88 ? (unsigned)(8192 - s) / 8 : 11;
        blkif_request_t *r = rw(f, BLKIF_OP_READ, s, n, DATA_BASE, 0, 7);
        expect(f, r, BLKIF_RSP_OKAY, "read discarded");
        memcpy(f->shadow + s * 512, page(f, DATA_BASE), (size_t)n * PAGE);
    }
    if (failures == before) item(8, "DISCARD in range OK (reads back), past end ERROR, secure ERROR");
}

static void check_indirect(struct fe *f) {
    int before = failures;
    CHECK(f->max_indirect >= 12, "feature-max-indirect-segments %u", f->max_indirect);
    unsigned counts[] = {12, 256, 600, f->max_indirect};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
        unsigned n = counts[c];
        uint64_t sector = 8 * (rnd() % ((f->sectors / 8) - n));
        for (unsigned i = 0; i < n; i++) {
            grant(f, DATA_BASE + i, false);
            fill_random(page(f, DATA_BASE + i), PAGE);
        }
        memcpy(f->shadow + sector * 512, page(f, DATA_BASE), (size_t)n * PAGE);
        blkif_request_t *r = indirect(f, BLKIF_OP_WRITE, sector, n, DATA_BASE, INDIRECT_BASE);
        expect(f, r, BLKIF_RSP_OKAY, "indirect write");
        memset(page(f, DATA_BASE), 0, (size_t)n * PAGE);
        r = indirect(f, BLKIF_OP_READ, sector, n, DATA_BASE, INDIRECT_BASE);
        expect(f, r, BLKIF_RSP_OKAY, "indirect read");  /* answered with indirect_op */
        CHECK(memcmp(page(f, DATA_BASE), f->shadow + sector * 512, (size_t)n * PAGE) == 0,
              "indirect read of %u segments differs", n);
    }
    blkif_request_t *r = indirect(f, BLKIF_OP_READ, 0, f->max_indirect + 1, DATA_BASE, INDIRECT_BASE);
    expect(f, r, BLKIF_RSP_ERROR, "indirect over max");
    r = indirect(f, BLKIF_OP_READ, 0, 1, DATA_BASE, INDIRECT_BASE);
    ((blkif_request_indirect_t *)r)->nr_segments = 65535;
    expect(f, r, BLKIF_RSP_ERROR, "indirect 65535 segments");
    if (failures == before) item(9, "INDIRECT 12..max segments over several pages, op = indirect_op, over max ERROR");
}

static void check_full_ring(struct fe *f) {
    int before = failures;
    unsigned n = RING_SIZE(&f->ring);
    uint64_t base = next_id;
    uint64_t start = rnd() % (f->sectors / 8);
    for (unsigned i = 0; i < n; i++) {
        unsigned pg = DATA_BASE + (i % 512) * 2;
        grant(f, pg, false);
        /* distinct sectors for every request: order between requests in one batch is free */
        uint64_t sector = 8 * ((start + i) % (f->sectors / 8));
        if (i % 2) {
            rw(f, BLKIF_OP_READ, sector, 1, pg, 0, 7);
        } else {
            fill_random(page(f, pg), PAGE);
            memcpy(f->shadow + sector * 512, page(f, pg), PAGE);
            rw(f, BLKIF_OP_WRITE, sector, 1, pg, 0, 7);
        }
    }
    push(f);
    struct resp *rs = calloc(n, sizeof *rs);
    int got = collect(f, rs, n, 20000);
    CHECK(got == (int)n, "full ring: %d of %u responses", got, n);
    uint8_t *seen = calloc(n, 1);
    for (int i = 0; i < got; i++) {
        uint64_t k = rs[i].id - base;
        CHECK(k < n && !seen[k], "response id %" PRIu64 " unexpected or repeated", rs[i].id);
        if (k < n) seen[k] = 1;
        CHECK(rs[i].status == BLKIF_RSP_OKAY, "full ring status %d", rs[i].status);
    }
    free(rs);
    free(seen);
    if (failures == before) item(10, "full ring: every id answered exactly once, padding zero");
}

static void check_notify(struct fe *f) {
    int before = failures;
    grant(f, DATA_BASE, false);
    /* Let the backend go idle: it must have armed req_event = req_cons + 1. */
    usleep(50000);
    while (wait_event(f, 0)) {}
    CHECK(f->sring->req_event == f->ring.req_prod_pvt + 1, "req_event %u not armed (prod %u)",
          f->sring->req_event, f->ring.req_prod_pvt);
    /* rsp_event far ahead: the backend must answer without notifying. */
    f->sring->rsp_event = f->ring.rsp_cons + 1000;
    xen_mb();
    rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    push(f);
    double end = now() + 5;
    while (f->sring->rsp_prod == f->ring.rsp_cons && now() < end) usleep(100);
    CHECK(f->sring->rsp_prod != f->ring.rsp_cons, "no response");
    CHECK(!wait_event(f, 100), "notified although rsp_event was not crossed");
    f->ring.rsp_cons = f->sring->rsp_prod;
    /* rsp_event at the next response: notified. */
    f->sring->rsp_event = f->ring.rsp_cons + 1;
    xen_mb();
    rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    push(f);
    CHECK(wait_event(f, 5000), "not notified when rsp_event was crossed");
    struct resp r;
    CHECK(collect(f, &r, 1, 5000) == 1, "notified response missing");
    /* Ping-pong: thousands of single requests, each published with the notify macro and waited
     * for only through notifications + RING_FINAL_CHECK_FOR_RESPONSES.  A lost wake-up on either
     * side (backend asleep with work on the ring, or a response without the promised kick)
     * stalls one round trip past its deadline. */
    for (int i = 0; i < 3000; i++) {
        blkif_request_t *p = rw(f, BLKIF_OP_READ, 8 * (i % 64), 1, DATA_BASE, 0, 7);
        uint64_t id = p->id;
        push(f);
        struct resp pr;
        if (collect(f, &pr, 1, 2000) != 1 || pr.id != id) {
            fail("ping-pong round trip %d stalled (lost wake-up?)", i);
            break;
        }
    }
    /* A storm of spurious kicks with nothing on the ring, then normal service. */
    for (int i = 0; i < 100000; i++) kick(f->evfd);
    usleep(20000);
    blkif_request_t *q = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    CHECK(call(f, q->id, BLKIF_OP_READ) == BLKIF_RSP_OKAY, "service after event storm");
    if (failures == before) item(11, "notify only when rsp_event crossed; req_event armed; 3000 notify-driven round trips; event storm survived");
}

static void check_hostile(struct fe *f) {
    int before = failures;
    grant(f, DATA_BASE, false);
    /* Duplicate ids: both answered. */
    blkif_request_t *a = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    blkif_request_t *b = rw(f, BLKIF_OP_READ, 8, 1, DATA_BASE + 1, 0, 7);
    grant(f, DATA_BASE + 1, false);
    b->id = a->id;
    uint64_t dup = a->id;
    push(f);
    struct resp rs[2];
    CHECK(collect(f, rs, 2, 5000) == 2 && rs[0].id == dup && rs[1].id == dup, "duplicate ids");
    /* Slot mutated right after publishing: the backend answers from its one copy; whatever it
     * saw, it answers exactly one response for the slot. */
    for (int i = 0; i < 200; i++) {
        blkif_request_t *m = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
        push(f);
        m->nr_segments = (i % 2) ? 200 : 1;
        m->seg[0].last_sect = (i % 3) ? 7 : 9;
        struct resp r;
        CHECK(collect(f, &r, 1, 5000) == 1, "mutated slot not answered");
    }
    /* Watch flood on our own nodes: the backend must keep serving. */
    for (int i = 0; i < 2000; i++) {
        xs_put(f, XBT_NULL, "state", "%d", XenbusStateConnected);
        xs_put(f, XBT_NULL, "junk", "%d", i);
    }
    blkif_request_t *q = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    CHECK(call(f, q->id, BLKIF_OP_READ) == BLKIF_RSP_OKAY, "service after watch flood");
    CHECK(be_state(f) == XenbusStateConnected, "watch flood changed backend state");
    /* req_prod far ahead: ring halted, no response, no spin; device still closes. */
    f->sring->req_prod = f->ring.req_prod_pvt + RING_SIZE(&f->ring) + 5;
    kick(f->evfd);
    usleep(100000);
    CHECK(f->sring->rsp_prod == f->ring.rsp_cons, "halted ring produced responses");
    close_device(f);
    clear_keys(f);
    reopen_device(f);
    if (failures == before) item(12, "hostile: duplicate ids, mutated slots, watch flood, req_prod overflow halts");
}

static void check_teardown(struct fe *f, int order) {
    int before = failures;
    /* In-flight I/O at close: every request is answered before the backend reports Closed. */
    unsigned n = RING_SIZE(&f->ring) < 64 ? RING_SIZE(&f->ring) : 64;
    for (unsigned i = 0; i < n; i++) {
        grant(f, DATA_BASE + i, false);
        rw(f, BLKIF_OP_READ, 8 * i, 1, DATA_BASE + i, 0, 7);
    }
    push(f);
    set_state(f, XenbusStateClosing);
    set_state(f, XenbusStateClosed);
    CHECK(wait_be_state(f, XenbusStateClosed, 10000), "backend not Closed with I/O in flight");
    RING_IDX rp = f->sring->rsp_prod;
    CHECK(rp == f->ring.req_prod_pvt, "in-flight requests unanswered at Closed (%u of %u)",
          rp - f->ring.rsp_cons, n);
    f->ring.rsp_cons = rp;
    /* Reconnect (1 -> backend 2), do I/O, close again. */
    clear_keys(f);
    reopen_device(f);
    CHECK(connect_device(f, order, true), "reconnect");
    blkif_request_t *q = rw(f, BLKIF_OP_READ, 0, 1, DATA_BASE, 0, 7);
    CHECK(call(f, q->id, BLKIF_OP_READ) == BLKIF_RSP_OKAY, "I/O after reconnect");
    /* A few fast 3 <-> 6 flips. */
    for (int i = 0; i < 20; i++) {
        set_state(f, XenbusStateClosed);
        CHECK(wait_be_state(f, XenbusStateClosed, 5000), "flip: not Closed");
        clear_keys(f);
        reopen_device(f);
        CHECK(connect_device(f, order, true), "flip: reconnect");
    }
    if (failures == before) item(15, "teardown answers in-flight I/O before Closed; 6 -> 1 -> 2 reconnect; flips");
}

static void check_resize(struct fe *f) {
    int before = failures;
    uint64_t old = f->sectors;
    printf("resize?\n");
    fflush(stdout);
    double end = now() + 10;
    uint64_t s = old;
    while (s == old && now() < end) {
        usleep(1000);
        s = xs_get_long(f, f->be_path, "sectors", 0);
    }
    CHECK(s == old - 2048, "sectors after resize: %" PRIu64 " (was %" PRIu64 ")", s, old);
    CHECK(be_state(f) == XenbusStateConnected, "state after resize");
    f->sectors = s;
    grant(f, DATA_BASE, false);
    blkif_request_t *r = rw(f, BLKIF_OP_READ, s - 8, 1, DATA_BASE, 0, 7);
    expect(f, r, BLKIF_RSP_OKAY, "read at the new end");
    r = rw(f, BLKIF_OP_READ, s, 1, DATA_BASE, 0, 7);
    expect(f, r, BLKIF_RSP_ERROR, "read past the new end");
    printf("restore?\n");
    fflush(stdout);
    end = now() + 10;
    while (s != old && now() < end) {
        usleep(1000);
        s = xs_get_long(f, f->be_path, "sectors", 0);
    }
    CHECK(s == old, "sectors not restored");
    f->sectors = old;
    if (failures == before) item(14, "resize: sectors rewritten, state rewritten, new end enforced");
}

/* ---- benchmark ----------------------------------------------------------------------------------- */

static int bench(struct fe *f, int argc, char **argv) {
    const char *op = "read";
    unsigned segs = 1, depth = 32;
    double seconds = 2;
    bool random_io = false;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--op")) op = argv[++i];
        else if (!strcmp(argv[i], "--segs")) segs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--depth")) depth = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--random")) random_io = true;
        else if (!strcmp(argv[i], "--order")) i++;
    }
    if (depth > RING_SIZE(&f->ring)) depth = RING_SIZE(&f->ring);
    if (segs > BLKIF_MAX_SEGMENTS_PER_REQUEST && depth > 64) depth = 64;
    uint8_t kind = strcmp(op, "write") ? BLKIF_OP_READ : BLKIF_OP_WRITE;
    bool ind = segs > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    unsigned slot_pages = segs;
    if ((size_t)DATA_BASE + (size_t)depth * slot_pages > f->npages) die("not enough guest memory");
    for (unsigned i = 0; i < depth * slot_pages; i++) {
        grant(f, DATA_BASE + i, false);
        fill_random(page(f, DATA_BASE + i), PAGE);
    }
    uint64_t span = f->sectors / 8 / segs;  /* request-sized units */
    uint64_t seq = 0, done = 0, issued = 0;
    uint64_t *slot_of = calloc(depth, sizeof *slot_of);
    struct resp *rs = calloc(depth, sizeof *rs);
    double t0 = now(), deadline = t0 + seconds;
    unsigned inflight = 0;
    unsigned *free_slots = calloc(depth, sizeof *free_slots);
    unsigned nfree = depth;
    for (unsigned i = 0; i < depth; i++) free_slots[i] = i;
    (void)slot_of;
    for (;;) {
        bool stop = now() >= deadline;
        while (!stop && nfree) {
            unsigned slot = free_slots[--nfree];
            uint64_t unit = random_io ? rnd() % span : (seq++ % span);
            uint64_t sector = unit * segs * 8;
            blkif_request_t *r;
            if (ind) r = indirect(f, kind, sector, segs, DATA_BASE + slot * slot_pages, INDIRECT_BASE + slot * 8);
            else r = rw(f, kind, sector, segs, DATA_BASE + slot * slot_pages, 0, 7);
            r->id = slot;
            inflight++;
            issued++;
        }
        push(f);
        if (!inflight) break;
        int got = collect_some(f, rs, inflight, (int)(inflight + 1) / 2, 10000);
        if (got == 0) die("bench: backend stopped answering");
        for (int i = 0; i < got; i++) {
            if (rs[i].status != BLKIF_RSP_OKAY) die("bench: status %d", rs[i].status);
            free_slots[nfree++] = (unsigned)rs[i].id;
        }
        inflight -= got;
        done += got;
    }
    double t = now() - t0;
    printf("{\"iops\": %.1f, \"mbps\": %.1f, \"requests\": %" PRIu64 ", \"seconds\": %.3f, "
           "\"notifications\": %lu}\n",
           done / t, done * segs * 4096.0 / t / 1e6, done, t, f->notifications);
    (void)issued;
    return 0;
}

/* ---- main ------------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s DIR FRONTEND_PATH check|bench [options]\n", argv[0]);
        return 2;
    }
    struct fe f = {.dir = argv[1], .evfd = -1};
    snprintf(f.fe_path, sizeof f.fe_path, "%s", argv[2]);
    const char *mode = argv[3];
    const char *shadow_path = NULL;
    bool read_only = false, resize = false, hostile = true;
    int order = 0;
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--shadow")) shadow_path = argv[++i];
        else if (!strcmp(argv[i], "--read-only")) read_only = true;
        else if (!strcmp(argv[i], "--resize")) resize = true;
        else if (!strcmp(argv[i], "--order")) order = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-hostile")) hostile = false;
    }
    f.xs = xs_open(XS_OPEN_SOCKETONLY);
    if (!f.xs) die("xs_open (XENSTORED_PATH=%s): %s", getenv("XENSTORED_PATH"), strerror(errno));
    char *be = xs_get(&f, f.fe_path, "backend");
    if (!be) die("no %s/backend", f.fe_path);
    snprintf(f.be_path, sizeof f.be_path, "%s", be);
    free(be);
    size_t memsize, gsize;
    f.mem = map_file(f.dir, "memory", &memsize);
    f.grants = map_file(f.dir, "grants", &gsize);
    f.npages = gsize;
    if (!strcmp(mode, "bench")) {
        if (!connect_device(&f, order, true)) die("connect failed");
        int rc = bench(&f, argc - 4, argv + 4);
        close_device(&f);
        return rc;
    }
    check_geometry();
    if (!connect_device(&f, order, true)) die("connect failed");
    check_handshake(&f, read_only);
    f.shadow = malloc(f.sectors * 512);
    read_all(&f, f.shadow);
    if (!read_only) {
        check_rw(&f);
        check_flush_barrier(&f);
        check_discard(&f);
        check_indirect(&f);
        check_full_ring(&f);
    }
    check_errors(&f, read_only);
    check_unsupported(&f);
    check_notify(&f);
    if (resize) check_resize(&f);
    /* Our final view of the disk, read back through the backend, must equal the shadow. */
    uint8_t *final = malloc(f.sectors * 512);
    read_all(&f, final);
    CHECK(memcmp(final, f.shadow, f.sectors * 512) == 0, "final read-back differs from the shadow");
    if (!read_only) {
        blkif_request_t *r = rw(&f, BLKIF_OP_FLUSH_DISKCACHE, 0, 0, DATA_BASE, 0, 7);
        CHECK(call(&f, r->id, BLKIF_OP_FLUSH_DISKCACHE) == BLKIF_RSP_OKAY, "final flush");
    }
    if (shadow_path) {
        FILE *out = fopen(shadow_path, "wb");
        if (!out || fwrite(f.shadow, 512, f.sectors, out) != f.sectors) die("write %s", shadow_path);
        fclose(out);
    }
    printf("flushed\n");
    fflush(stdout);
    if (hostile) check_hostile(&f);
    else { close_device(&f); clear_keys(&f); reopen_device(&f); }
    check_bad_connects(&f);
    CHECK(connect_device(&f, order, true), "connect after refusals");
    check_teardown(&f, order);
    close_device(&f);
    /* 13: we write feature-persistent=0 and the backend offers none, so every grant must be
     * unmapped before its response (the harness also counts live mappings: must be 0). */
    if (xs_get_long(&f, f.be_path, "feature-persistent", 1) == 0)
        item(13, "no persistent grants (feature-persistent=0); harness checks no mapping is left");
    else
        fail("backend offers persistent grants");
    printf("%s: %d failure(s)\n", progname, failures);
    xs_close(f.xs);
    return failures ? 1 : 0;
}
