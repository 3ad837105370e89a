# Helpers for the guest scenarios: every check prints one marker line the dom0 tests assert on.
# "VHDTEST PASS what" / "VHDTEST FAIL what: detail"; "VHDTEST INFO key value" carries a fact.

pass() { echo "VHDTEST PASS $*"; }
fail() { echo "VHDTEST FAIL $*"; }
info() { echo "VHDTEST INFO $*"; }

# check WHAT CMD...: PASS if CMD succeeds, FAIL with its output otherwise.
check() {
    what=$1
    shift
    if out=$("$@" 2>&1); then pass "$what"; else fail "$what: $(echo "$out" | tail -3 | tr '\n' ' ')"; fi
}

# wait_disk DEV [SECONDS]: wait for /dev/DEV to appear (blkfront connects asynchronously).
wait_disk() {
    n=0
    while [ ! -b "/dev/$1" ] && [ $n -lt "${2:-120}" ]; do sleep 1; n=$((n + 1)); done
    [ -b "/dev/$1" ]
}

# odd_io DEV SECTOR COUNT [SECTOR_BYTES]: one O_DIRECT write of COUNT sectors at SECTOR (sectors
# of SECTOR_BYTES, 512 by default; 4096 on a 4K-native disk, which refuses less), read back the
# same way; the MD5 goes to dom0, which reads the same range from the image.
odd_io() {
    ss=${4:-512}
    dd if=/dev/urandom of=/tmp/w bs=$ss count=$3 2>/dev/null
    if ! dd if=/tmp/w of=/dev/$1 bs=$(($3 * ss)) count=1 seek=$(($2 * ss)) \
            oflag=direct,seek_bytes 2>/tmp/err; then
        fail "odd io $1 $2+$3: write: $(cat /tmp/err)"
        return
    fi
    dd if=/dev/$1 of=/tmp/r bs=$(($3 * ss)) count=1 skip=$(($2 * ss)) \
        iflag=direct,skip_bytes 2>/dev/null
    if cmp -s /tmp/w /tmp/r; then pass "odd io $1 $2+$3"; else fail "odd io $1 $2+$3: read back differs"; fi
    info "md5_$1_$2_$3 $(md5sum </tmp/w | cut -d' ' -f1)"
}
