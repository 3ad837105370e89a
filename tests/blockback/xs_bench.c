/*
 * libxenstore speed against a xenstored (benchmarks/xenstore.py): N write+read round trips,
 * then N transactions of four writes (a frontend's talk_to_blkback).
 * Usage: XENSTORED_PATH=<socket> ./xs_bench N   ->  "rw <seconds>\ntx <seconds>\n"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xenstore.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    struct xs_handle *h = xs_open(0);
    if (!h) {
        perror("xs_open");
        return 1;
    }
    char value[32];
    double t0 = now();
    for (int i = 0; i < n; i++) {
        unsigned int len;
        snprintf(value, sizeof value, "%d", i);
        if (!xs_write(h, XBT_NULL, "/bench/c/key", value, strlen(value)))
            return 1;
        char *v = xs_read(h, XBT_NULL, "/bench/c/key", &len);
        if (!v)
            return 1;
        free(v);
    }
    printf("rw %.6f\n", now() - t0);
    t0 = now();
    static const char *keys[] = { "/bench/c/fe/ring-ref", "/bench/c/fe/event-channel",
                                  "/bench/c/fe/protocol", "/bench/c/fe/state" };
    for (int i = 0; i < n; i++) {
        xs_transaction_t t = xs_transaction_start(h);
        for (int k = 0; k < 4; k++)
            xs_write(h, t, keys[k], "8", 1);
        if (!xs_transaction_end(h, t, false))
            return 1;
    }
    printf("tx %.6f\n", now() - t0);
    xs_close(h);
    return 0;
}
