#!/usr/bin/env bash
# schemathesis against docs/openapi.yaml on a live VMM: a real cloud-hypervisor process serving
# its API socket, reached through ci/unix_forward.py on 127.0.0.1 (schemathesis takes a URL).
#
# Passes when: the VMM never dies (it still answers vmm.ping at the end and exits 0 on SIGTERM),
# no status code is outside what the spec lists for the operation (so no unlisted 5xx), and every
# response matches its schema, content type and headers.
#
# The VMM runs under --landlock with one scratch directory allowed: schemathesis sends snapshot
# destinations, restore sources and region paths of its own invention, and the VMM must not
# create directories or files all over the host. vmm.shutdown, vm.power-fail and vm.nv-suspend
# are left out: ending the VMM is what they are for.
#
#   bash ci/schemathesis.sh             # about 2 minutes (ST_MAX_TIME=100 s of testing)
#   ST_MAX_TIME=20 bash ci/schemathesis.sh
# Needs ci/install-deps.sh (schemathesis in a venv, pinned) and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

st="${ST_BIN:-${NV_CI_VENV:-$HOME/.cache/nv-hypervisor/venv}/bin/st}"
[ -x "$st" ] || { echo "schemathesis: $st missing (run ci/install-deps.sh)" >&2; exit 1; }
max_time="${ST_MAX_TIME:-100}"

cargo build --release --quiet -p cloud-hypervisor
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
vmm="$target/release/cloud-hypervisor"

base=/dev/shm
[ -d "$base" ] && [ -w "$base" ] || base=${TMPDIR:-/tmp}
work=$(mktemp -d "$base/nv-schemathesis.XXXXXX")
mkdir "$work/sandbox"
vmm_pid=
forward_pid=
cleanup() {
    [ -n "$forward_pid" ] && kill "$forward_pid" 2>/dev/null || true
    [ -n "$vmm_pid" ] && kill -KILL "$vmm_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$vmm" --api-socket "path=$work/api.sock" --landlock \
    --landlock-rules "path=$work/sandbox,access=rw" -v --log-file "$work/vmm.log" &
vmm_pid=$!
for _ in $(seq 200); do [ -S "$work/api.sock" ] && break; sleep 0.05; done
[ -S "$work/api.sock" ] || { cat "$work/vmm.log" >&2; echo "schemathesis: no API socket" >&2; exit 1; }

python3 ci/unix_forward.py "$work/api.sock" > "$work/port" &
forward_pid=$!
for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.05; done
port=$(cat "$work/port")

echo "schemathesis $("$st" --version | awk '{print $NF}') against docs/openapi.yaml, VMM pid $vmm_pid, http://127.0.0.1:$port"
set +e
# From the scratch directory: schemathesis keeps its example database in the working directory.
cd "$work"
"$st" run "$root/docs/openapi.yaml" --url "http://127.0.0.1:$port/api/v1" \
    --checks status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --exclude-path /vmm.shutdown --exclude-path /vm.power-fail --exclude-path /vm.nv-suspend \
    --max-time "$max_time" --workers 1 --seed "${ST_SEED:-53}" --request-timeout 30 \
    --suppress-health-check all --report ndjson --report-ndjson-path "$work/events.ndjson" \
    --output-truncate true --no-color 2>&1 | tee "$work/st.out"
st_status=${PIPESTATUS[0]}
set -e

alive=yes
kill -0 "$vmm_pid" 2>/dev/null || alive=no
ping=$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$work/api.sock" \
    http://localhost/api/v1/vmm.ping || true)
kill -TERM "$vmm_pid" 2>/dev/null || true
vmm_status=0
wait "$vmm_pid" || vmm_status=$?
vmm_pid=
requests=$(grep -c '"ScenarioFinished"\|"StepFinished"' "$work/events.ndjson" 2>/dev/null || true)
echo "schemathesis: exit $st_status; VMM alive at the end: $alive, vmm.ping $ping, exit on SIGTERM $vmm_status"
if [ "$alive" != yes ] || [ "$ping" != 200 ] || [ "$vmm_status" != 0 ]; then
    tail -50 "$work/vmm.log" >&2
    echo "schemathesis: the VMM crashed or stopped answering" >&2
    exit 1
fi
[ "$st_status" -eq 0 ] || { echo "schemathesis: findings (see above)" >&2; exit 1; }
echo "schemathesis: no findings"
