/*
 * Print the XenStore wire constants of /usr/include/xen/io/xs_wire.h (libxen-dev) for
 * tests/blockback/xenstore/test_wire.py to compare with blockback/xenstore/wire.py.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/xs_wire.h>

#define NUM(x) printf("%s %ld\n", #x, (long)(x))

int main(void)
{
    NUM(XS_CONTROL);
    NUM(XS_DIRECTORY);
    NUM(XS_READ);
    NUM(XS_GET_PERMS);
    NUM(XS_WATCH);
    NUM(XS_UNWATCH);
    NUM(XS_TRANSACTION_START);
    NUM(XS_TRANSACTION_END);
    NUM(XS_INTRODUCE);
    NUM(XS_RELEASE);
    NUM(XS_GET_DOMAIN_PATH);
    NUM(XS_WRITE);
    NUM(XS_MKDIR);
    NUM(XS_RM);
    NUM(XS_SET_PERMS);
    NUM(XS_WATCH_EVENT);
    NUM(XS_ERROR);
    NUM(XS_IS_DOMAIN_INTRODUCED);
    NUM(XS_RESUME);
    NUM(XS_SET_TARGET);
    NUM(XS_RESET_WATCHES);
    NUM(XS_DIRECTORY_PART);
    NUM(XS_TYPE_COUNT);
    NUM(XS_INVALID);
    NUM(XENSTORE_PAYLOAD_MAX);
    NUM(XENSTORE_ABS_PATH_MAX);
    NUM(XENSTORE_REL_PATH_MAX);
    NUM(sizeof(struct xsd_sockmsg));
    NUM(offsetof(struct xsd_sockmsg, type));
    NUM(offsetof(struct xsd_sockmsg, req_id));
    NUM(offsetof(struct xsd_sockmsg, tx_id));
    NUM(offsetof(struct xsd_sockmsg, len));
    for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("ERROR %zu %s %d\n", i, xsd_errors[i].errstring, xsd_errors[i].errnum);
    printf("WRITE_MODES %s %s %s\n", XS_WRITE_NONE, XS_WRITE_CREATE, XS_WRITE_CREATE_EXCL);
    return 0;
}
