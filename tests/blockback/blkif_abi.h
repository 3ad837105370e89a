/* Xen's own blkif types for the test frontend, in either guest layout.
 *
 * Native (x86_64-abi): the structs exactly as xen/io/blkif.h defines them.
 * -DBLKIF_X86_32 (x86_32-abi): the same header under the i386 alignment rule (uint64_t aligned to
 * 4), which is how Linux blkback's blkif_x86_32_request is declared (#pragma pack(4)).  The
 * debian headers do not ship the x86_32 variants and gcc here cannot target -m32.
 */
#ifndef VHDKIT_BLKIF_ABI_H
#define VHDKIT_BLKIF_ABI_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* Current interface version: ring.h then leaves the barriers to the includer (older versions
 * map them to the kernel's mb()/rmb()/wmb()).  Ours are real full fences. */
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#include <xen/xen.h>
#include <xen/grant_table.h>
#ifdef BLKIF_X86_32
#pragma pack(push, 4)
#endif
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#ifdef BLKIF_X86_32
#pragma pack(pop)
#endif
#include <xen/io/protocols.h>
#include <xen/io/xenbus.h>

#ifdef BLKIF_X86_32
#define BLKIF_PROTOCOL XEN_IO_PROTO_ABI_X86_32
_Static_assert(sizeof(blkif_request_t) == 108, "x86_32 request is 108 bytes");
_Static_assert(sizeof(blkif_response_t) == 12, "x86_32 response is 12 bytes");
_Static_assert(offsetof(blkif_request_t, id) == 4, "x86_32 id at 4");
#else
#define BLKIF_PROTOCOL XEN_IO_PROTO_ABI_X86_64
_Static_assert(sizeof(blkif_request_t) == 112, "x86_64 request is 112 bytes");
_Static_assert(sizeof(blkif_response_t) == 16, "x86_64 response is 16 bytes");
_Static_assert(offsetof(blkif_request_t, id) == 8, "x86_64 id at 8");
#endif

#endif
