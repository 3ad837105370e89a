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
