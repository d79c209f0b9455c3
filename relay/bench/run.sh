#!/usr/bin/env bash
# Relay numbers for BENCHMARKS.md ("Relay"): each run starts a fresh cinder-relay on
# loopback (rate limits off) and drives it with cinder-relay-load on the same machine.
# Usage: relay/bench/run.sh [quick]   (quick: 5 s runs, fewer idle sessions)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p cinder-relay >/dev/null
BIN=$PWD/target/release
WORK=${CINDER_BENCH_DIR:-$PWD}/relay-bench.$$
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
quick=${1:-}
dur=20s; idle=17000; idle_only=18900; idle_dur=30s
if [ "$quick" = quick ]; then dur=5s; idle=2000; idle_only=3000; idle_dur=5s; fi

# The machine's own limit, same run: a 1 KiB write + fdatasync, one at a time.
echo "=== machine: 2,000 x (1 KiB write + fdatasync)"
dd if=/dev/zero of="$WORK/dsync" bs=1k count=2000 oflag=dsync 2>&1 | tail -1

run() { # name, relay flags..., --, load flags...
  local name=$1; shift
  local rflags=(); while [ "$1" != "--" ]; do rflags+=("$1"); shift; done; shift
  local d="$WORK/run"; rm -rf "$d"; mkdir -p "$d"
  "$BIN/cinder-relay" --listen 127.0.0.1:0 --data "$d/data" --key-file "$d/key" \
    --accounts "$d/accounts" --accounts-per-minute 0 --send-rate 0 \
    --recipient-bytes-per-minute 0 "${rflags[@]}" > "$d/out" 2> "$d/err" &
  local pid=$!
  local addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/^listening on http:\/\///p' "$d/out")
    [ -n "$addr" ] && break; sleep 0.1
  done
  echo "=== $name"
  "$BIN/cinder-relay-load" --target "$addr" --server-pid "$pid" "$@" 2> "$d/load.err" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for mode in sync group async; do
  run "$mode, 1000 recipients, 16 senders, 1 KiB" --durability "$mode" -- \
    --recipients 1000 --senders 16 --duration "$dur"
done
run "group, 1000 recipients at 1000 msgs/s, $idle idle sessions" --durability group -- \
  --recipients 1000 --idle "$idle" --rate 1000 --senders 16 --duration "$idle_dur"
run "group, 1000 recipients at 1000 msgs/s, no idle sessions" --durability group -- \
  --recipients 1000 --rate 1000 --senders 16 --duration "$idle_dur"
run "idle only, $idle_only sessions" -- --recipients 0 --idle "$idle_only" --duration 15s
