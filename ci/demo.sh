#!/usr/bin/env bash
# The README's first command: a VM whose RAM lives in an NV region survives a power failure.
#
#   build (release) -> create a region -> boot the counter test guest on it -> SIGPWR (what a UPS
#   daemon sends) -> the VMM saves in place and exits 75 -> a new VMM recovers the VM in place ->
#   the counter continues from where it was.
#
# The region is a plain file on /dev/shm (tmpfs stands in for NV memory on a machine without
# NVDIMMs); everything is removed at the end. Needs /dev/kvm, gcc (ci/install-deps.sh) and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }

[ -e /dev/kvm ] || fail "/dev/kvm is missing: this demo runs a real KVM guest"

step "1. Building cloud-hypervisor (release) and the counter test guest"
cargo build --release --quiet -p cloud-hypervisor -p integration-tests --bin cloud-hypervisor \
    --bin test-guest
# A relative CARGO_TARGET_DIR is relative to the workspace root, where cargo ran.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
vmm="$target/release/cloud-hypervisor"
# The guest is built by the test harness's own code (integration_tests::guests, the one place
# its compiler flags live), and told this host's TSC rate, its time base (KVM_GET_TSC_KHZ).
kernel=$("$target/release/test-guest" image counter) || fail "building the counter guest"
cmdline=$("$target/release/test-guest" cmdline area_mb=16) || fail "reading the TSC rate"

base=/dev/shm
[ -d "$base" ] && [ -w "$base" ] || base=${TMPDIR:-/tmp}
work=$(mktemp -d "$base/nv-demo.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

echo "    binary: $vmm"
echo "    guest:  $kernel (command line: $cmdline)"

region="$work/region"
ram=256M

count_lines() { cat "$1" 2>/dev/null | grep -c '^counter=' || true; }

# Waits until file $1 has at least $2 counter lines (or the VMM $3 is gone).
wait_lines() {
    local waited=0
    while [ "$(count_lines "$1")" -lt "$2" ]; do
        kill -0 "$3" 2>/dev/null || { cat "$1" >&2 || true; fail "the VMM exited early"; }
        sleep 0.02
        waited=$((waited + 1))
        [ "$waited" -lt 1500 ] || fail "no counter output after 30 s"
    done
}

last_counter() { grep '^counter=' "$1" | tail -1 | sed 's/^counter=\([0-9]*\).*/\1/'; }
first_counter() { grep '^counter=' "$1" | head -1 | sed 's/^counter=\([0-9]*\).*/\1/'; }

step "2. Booting the counter guest with $ram of RAM in a new NV region ($region)"
echo "    $ cloud-hypervisor --kernel counter --memory size=$ram --serial file=serial-1.log \\"
echo "        --nv region=$region,vm=demo,create=on"
"$vmm" --kernel "$kernel" --cmdline "$cmdline" --memory "size=$ram" \
    --serial "file=$work/serial-1.log" --console off \
    --nv "region=$region,vm=demo,create=on" -v --log-file "$work/vmm-1.log" &
pid=$!
pids+=("$pid")
wait_lines "$work/serial-1.log" 5 "$pid"
echo "    guest serial output so far:"
sed 's/^/      | /' "$work/serial-1.log"

step "3. Power failure: SIGPWR to the VMM (pid $pid), as apcupsd/NUT would send on battery"
kill -PWR "$pid"
set +e
wait "$pid"
code=$?
set -e
before=$(last_counter "$work/serial-1.log")
echo "    VMM exit code: $code (75 = state saved in place, powered off)"
[ "$code" -eq 75 ] || { cat "$work/vmm-1.log" >&2; fail "expected exit code 75"; }
echo "    save report (per phase, from the VMM log):"
grep -E 'phase [0-9]|committed .*deadline' "$work/vmm-1.log" | sed 's/^.* -- /      /'
echo "    last counter value before the power failure: $before"

step "4. Recovery: a new VMM maps the VM's memory where it is and loads the saved state"
echo "    $ cloud-hypervisor --nv region=$region,vm=demo,recover=on --serial file=serial-2.log"
started=$(date +%s%N)
"$vmm" --nv "region=$region,vm=demo,recover=on" \
    --serial "file=$work/serial-2.log" --console off -v --log-file "$work/vmm-2.log" &
pid=$!
pids+=("$pid")
wait_lines "$work/serial-2.log" 1 "$pid"
first_line_ms=$((($(date +%s%N) - started) / 1000000))
wait_lines "$work/serial-2.log" 3 "$pid"
grep -E 'resumed in place' "$work/vmm-2.log" | sed 's/^.* -- /    /'
echo "    first new serial line $first_line_ms ms after the recovering VMM started"
echo "    guest serial output after recovery:"
sed 's/^/      | /' "$work/serial-2.log"

step "5. Did it continue?"
after=$(first_counter "$work/serial-2.log")
echo "    last counter before the power failure: $before"
echo "    first counter after recovery:          $after"
grep -q 'counter: boot' "$work/serial-2.log" && fail "the guest booted again"
grep -q 'MISMATCH' "$work/serial-2.log" && fail "the guest's memory checksum failed"
[ "$after" -gt "$before" ] || fail "the counter did not continue"
echo "    yes: no new boot, the counter went on from $before to $after, memory checksums ok"

step "6. Cleaning up (SIGTERM saves the VM in place and ends the VMM; the region is deleted)"
kill -TERM "$pid"
wait "$pid" || true
echo "    done"
