/* Prints Xen's blkif structs, filled with known values, as hex: the Python codecs are compared
 * byte for byte against them (tests/blockback/test_abi.py). */
#include <stdio.h>
#include "blkif_abi.h"

static void hex(const char *name, const void *p, size_t n) {
    const unsigned char *b = p;
    printf("%s ", name);
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

int main(void) {
    printf("protocol %s\n", BLKIF_PROTOCOL);
    printf("sizes %zu %zu %zu\n", sizeof(blkif_request_t), sizeof(blkif_response_t),
           sizeof(union blkif_sring_entry));
    printf("ring");
    for (int order = 0; order <= 4; order++) printf(" %u", (unsigned)__CONST_RING_SIZE(blkif, 4096 << order));
    printf("\n");
    blkif_request_t rw;
    memset(&rw, 0, sizeof rw);
    rw.operation = BLKIF_OP_WRITE;
    rw.nr_segments = 3;
    rw.handle = 0x1234;
    rw.id = 0x1122334455667788ULL;
    rw.sector_number = 0x0102030405060708ULL;
    for (int i = 0; i < 3; i++) {
        rw.seg[i].gref = 100 + i;
        rw.seg[i].first_sect = i;
        rw.seg[i].last_sect = 7;
    }
    hex("rw", &rw, sizeof rw);
    blkif_request_t d;
    memset(&d, 0, sizeof d);
    blkif_request_discard_t *disc = (blkif_request_discard_t *)&d;
    disc->operation = BLKIF_OP_DISCARD;
    disc->flag = BLKIF_DISCARD_SECURE;
    disc->id = 0xdeadbeefcafef00dULL;
    disc->sector_number = 4096;
    disc->nr_sectors = 0x99;
    hex("discard", &d, sizeof d);
    blkif_request_t in;
    memset(&in, 0, sizeof in);
    blkif_request_indirect_t *ind = (blkif_request_indirect_t *)&in;
    ind->operation = BLKIF_OP_INDIRECT;
    ind->indirect_op = BLKIF_OP_READ;
    ind->nr_segments = 600;
    ind->id = 77;
    ind->sector_number = 123456;
    ind->handle = 0;
    for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++) ind->indirect_grefs[i] = 1000 + i;
    hex("indirect", &in, sizeof in);
    blkif_response_t r;
    memset(&r, 0, sizeof r);
    r.id = 0x0102030405060708ULL;
    r.operation = BLKIF_OP_FLUSH_DISKCACHE;
    r.status = BLKIF_RSP_EOPNOTSUPP;
    hex("response", &r, sizeof r);
    return 0;
}
