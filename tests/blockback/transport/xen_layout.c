/*
 * Print the ioctl numbers, struct sizes and field offsets of Linux's Xen gntdev and evtchn
 * interfaces as Debian's libxen-dev ships them (/usr/include/xen/sys/{gntdev,evtchn}.h), for
 * tests/blockback/transport/test_xen_abi.py to compare with blockback/transport/xen.py.
 * Output: one "NAME VALUE" per line (decimal), then "SEGMENT <hex>" lines: byte images of a
 * filled ioctl_gntdev_grant_copy_segment.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

typedef uint16_t domid_t; /* evtchn.h uses it; xen/xen.h would pull in the arch headers */
#include <xen/sys/evtchn.h>
#include <xen/sys/gntdev.h>
#include <xen/grant_table.h>

#define NUM(x) printf("%s %llu\n", #x, (unsigned long long)(x))
#define SIZE(s) printf("sizeof(%s) %zu\n", #s, sizeof(struct s))
#define OFF(s, f) printf("offsetof(%s.%s) %zu\n", #s, #f, offsetof(struct s, f))

static void hex(const char *tag, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("%s ", tag);
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

int main(void)
{
    NUM(IOCTL_GNTDEV_MAP_GRANT_REF);
    NUM(IOCTL_GNTDEV_UNMAP_GRANT_REF);
    NUM(IOCTL_GNTDEV_SET_MAX_GRANTS);
    NUM(IOCTL_GNTDEV_GRANT_COPY);
    NUM(GNTCOPY_source_gref);
    NUM(GNTCOPY_dest_gref);
    NUM(GNTST_okay);
    NUM(IOCTL_EVTCHN_BIND_INTERDOMAIN);
    NUM(IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    NUM(IOCTL_EVTCHN_UNBIND);
    NUM(IOCTL_EVTCHN_NOTIFY);
    NUM(IOCTL_EVTCHN_RESET);
    NUM(IOCTL_EVTCHN_RESTRICT_DOMID);

    SIZE(ioctl_gntdev_grant_ref);
    OFF(ioctl_gntdev_grant_ref, domid);
    OFF(ioctl_gntdev_grant_ref, ref);
    SIZE(ioctl_gntdev_map_grant_ref);
    OFF(ioctl_gntdev_map_grant_ref, count);
    OFF(ioctl_gntdev_map_grant_ref, pad);
    OFF(ioctl_gntdev_map_grant_ref, index);
    OFF(ioctl_gntdev_map_grant_ref, refs);
    SIZE(ioctl_gntdev_unmap_grant_ref);
    OFF(ioctl_gntdev_unmap_grant_ref, index);
    OFF(ioctl_gntdev_unmap_grant_ref, count);
    OFF(ioctl_gntdev_unmap_grant_ref, pad);
    SIZE(ioctl_gntdev_set_max_grants);
    SIZE(ioctl_gntdev_grant_copy_segment);
    OFF(ioctl_gntdev_grant_copy_segment, source);
    OFF(ioctl_gntdev_grant_copy_segment, dest);
    OFF(ioctl_gntdev_grant_copy_segment, len);
    OFF(ioctl_gntdev_grant_copy_segment, flags);
    OFF(ioctl_gntdev_grant_copy_segment, status);
    OFF(ioctl_gntdev_grant_copy_segment, source.foreign.ref);
    OFF(ioctl_gntdev_grant_copy_segment, source.foreign.offset);
    OFF(ioctl_gntdev_grant_copy_segment, source.foreign.domid);
    SIZE(ioctl_gntdev_grant_copy);
    OFF(ioctl_gntdev_grant_copy, count);
    OFF(ioctl_gntdev_grant_copy, segments);
    SIZE(ioctl_evtchn_bind_interdomain);
    OFF(ioctl_evtchn_bind_interdomain, remote_domain);
    OFF(ioctl_evtchn_bind_interdomain, remote_port);
    SIZE(ioctl_evtchn_bind_unbound_port);
    SIZE(ioctl_evtchn_unbind);
    SIZE(ioctl_evtchn_notify);
    SIZE(ioctl_evtchn_restrict_domid);

    /* Byte images: copy from a guest page into a local buffer, and the other way. */
    struct ioctl_gntdev_grant_copy_segment seg;
    memset(&seg, 0, sizeof seg);
    seg.source.foreign.ref = 0x11223344;
    seg.source.foreign.offset = 0x0200;
    seg.source.foreign.domid = 0x0007;
    seg.dest.virt = (void *)(uintptr_t)0x00007f0011223000ULL;
    seg.len = 0x0e00;
    seg.flags = GNTCOPY_source_gref;
    hex("SEGMENT_FROM_GUEST", &seg, sizeof seg);
    memset(&seg, 0, sizeof seg);
    seg.source.virt = (void *)(uintptr_t)0x00007f0044556000ULL;
    seg.dest.foreign.ref = 0x99;
    seg.dest.foreign.offset = 0;
    seg.dest.foreign.domid = 0x7ff0;
    seg.len = 0x1000;
    seg.flags = GNTCOPY_dest_gref;
    hex("SEGMENT_TO_GUEST", &seg, sizeof seg);
    return 0;
}
