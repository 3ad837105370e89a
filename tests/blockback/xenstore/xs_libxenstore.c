/*
 * libxenstore against our xenstore server: the calls a blkif frontend handshake makes.
 *
 * Build: gcc -o xs_libxenstore xs_libxenstore.c -lxenstore
 * Run:   XENSTORED_PATH=<socket> ./xs_libxenstore
 * Prints "ok <step>" per checked step and exits 0, or prints "FAIL <step>: <why>" and exits 1.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xenstore.h>

static int failed;

#define CHECK(step, cond, ...)                                              \
    do {                                                                    \
        if (cond) {                                                         \
            printf("ok %s\n", step);                                        \
        } else {                                                            \
            printf("FAIL %s: ", step);                                      \
            printf(__VA_ARGS__);                                            \
            printf(" (errno %d %s)\n", errno, strerror(errno));             \
            failed = 1;                                                     \
        }                                                                   \
        fflush(stdout);                                                     \
    } while (0)

static int read_is(struct xs_handle *h, xs_transaction_t t, const char *path, const char *want)
{
    unsigned int len = 0;
    char *v = xs_read(h, t, path, &len);
    int ok = v != NULL && len == strlen(want) && memcmp(v, want, len) == 0;
    free(v);
    return ok;
}

/* Wait for one watch event with the given path and token; 1 if it came. */
static int expect_watch(struct xs_handle *h, const char *path, const char *token)
{
    struct pollfd pfd = { .fd = xs_fileno(h), .events = POLLIN };
    for (int i = 0; i < 50; i++) {
        char **ev = xs_check_watch(h);
        if (ev != NULL) {
            int ok = strcmp(ev[XS_WATCH_PATH], path) == 0 &&
                     strcmp(ev[XS_WATCH_TOKEN], token) == 0;
            if (!ok)
                printf("# unexpected event %s %s\n", ev[XS_WATCH_PATH], ev[XS_WATCH_TOKEN]);
            free(ev);
            return ok;
        }
        poll(&pfd, 1, 100);
    }
    return 0;
}

int main(void)
{
    struct xs_handle *h = xs_open(0);
    struct xs_handle *h2 = xs_open(0);
    CHECK("open", h != NULL && h2 != NULL, "xs_open(0) failed");
    if (!h || !h2)
        return 1;

    /* Backend side of a handshake: toolstack keys, then state. */
    const char *be = "/local/domain/0/backend/vbd/5/768";
    const char *fe = "/local/domain/5/device/vbd/768";
    char path[256];
    snprintf(path, sizeof path, "%s/state", be);
    CHECK("write", xs_write(h, XBT_NULL, path, "1", 1), "xs_write %s", path);
    CHECK("read", read_is(h, XBT_NULL, path, "1"), "xs_read %s", path);

    char *dompath = xs_get_domain_path(h, 5);
    CHECK("get_domain_path", dompath && strcmp(dompath, "/local/domain/5") == 0, "got %s",
          dompath ? dompath : "(null)");
    free(dompath);

    /* The frontend watches the backend state; the watch fires at once on registration. */
    CHECK("watch", xs_watch(h2, path, "be-state"), "xs_watch");
    CHECK("watch initial fire", expect_watch(h2, path, "be-state"), "no initial event");
    CHECK("write InitWait", xs_write(h, XBT_NULL, path, "2", 1), "xs_write");
    CHECK("watch event", expect_watch(h2, path, "be-state"), "no event after write");

    /* The frontend publishes its keys in one transaction (talk_to_blkback), retrying EAGAIN. */
    int tries = 0;
    for (;;) {
        xs_transaction_t t = xs_transaction_start(h2);
        if (t == XBT_NULL) {
            CHECK("transaction_start", 0, "failed");
            break;
        }
        char key[256];
        snprintf(key, sizeof key, "%s/ring-ref", fe);
        xs_write(h2, t, key, "8", 1);
        snprintf(key, sizeof key, "%s/event-channel", fe);
        xs_write(h2, t, key, "15", 2);
        snprintf(key, sizeof key, "%s/protocol", fe);
        xs_write(h2, t, key, "x86_64-abi", 10);
        snprintf(key, sizeof key, "%s/state", fe);
        xs_write(h2, t, key, "3", 1);
        if (tries == 0) {
            /* Make the first attempt lose: another client changes a node it wrote. */
            xs_write(h, XBT_NULL, key, "1", 1);
        }
        tries++;
        if (xs_transaction_end(h2, t, false))
            break;
        if (errno != EAGAIN || tries > 10) {
            CHECK("transaction_end", 0, "unexpected failure");
            break;
        }
    }
    CHECK("transaction retried once", tries == 2, "tries=%d", tries);
    snprintf(path, sizeof path, "%s/event-channel", fe);
    CHECK("transaction committed", read_is(h, XBT_NULL, path, "15"), "event-channel missing");

    /* An aborted transaction leaves nothing. */
    xs_transaction_t ta = xs_transaction_start(h);
    snprintf(path, sizeof path, "%s/aborted", fe);
    xs_write(h, ta, path, "x", 1);
    CHECK("transaction abort", xs_transaction_end(h, ta, true), "abort failed");
    unsigned int len;
    char *gone = xs_read(h, XBT_NULL, path, &len);
    CHECK("aborted write invisible", gone == NULL && errno == ENOENT, "still there");
    free(gone);

    unsigned int num = 0;
    char **names = xs_directory(h, XBT_NULL, fe, &num);
    int saw_ring = 0;
    for (unsigned int i = 0; names && i < num; i++)
        saw_ring |= strcmp(names[i], "ring-ref") == 0;
    CHECK("directory", names && num == 4 && saw_ring, "num=%u", num);
    free(names);

    struct xs_permissions perms[2] = {
        { .id = 5, .perms = XS_PERM_NONE },
        { .id = 0, .perms = XS_PERM_READ },
    };
    CHECK("set_permissions", xs_set_permissions(h, XBT_NULL, fe, perms, 2), "failed");
    struct xs_permissions *got = xs_get_permissions(h, XBT_NULL, fe, &num);
    CHECK("get_permissions", got && num == 2 && got[0].id == 5 && got[0].perms == XS_PERM_NONE &&
                                 got[1].id == 0 && got[1].perms == XS_PERM_READ,
          "num=%u", num);
    free(got);

    CHECK("unwatch", xs_unwatch(h2, "/local/domain/0/backend/vbd/5/768/state", "be-state"),
          "failed");
    CHECK("rm", xs_rm(h, XBT_NULL, "/local/domain/5/device"), "failed");
    char *none = xs_read(h, XBT_NULL, fe, &len);
    CHECK("rm removed", none == NULL && errno == ENOENT, "still there");
    free(none);

    xs_close(h);
    xs_close(h2);
    return failed;
}
