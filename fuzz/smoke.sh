#!/usr/bin/env bash
# Fuzz smoke test for CI: installs cargo-fuzz if missing, builds every target without a
# sanitizer (works on the stable toolchain), runs each for FUZZ_SECONDS (default 30) from
# the committed seed corpus, and exits non-zero if any target crashes, hangs, runs out
# of memory or fails to build. New corpus entries go to target/smoke-corpus/ (ignored),
# never into the committed corpus/; crash inputs land in artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cargo fuzz build -s none

failed=()
for t in $(cargo fuzz list); do
    work="target/smoke-corpus/$t"
    mkdir -p "$work" "corpus/$t"
    echo "smoke: $t for ${seconds}s"
    # -timeout: one input running longer than this is a hang; -rss_limit_mb: memory.
    if ! cargo fuzz run -s none "$t" "$work" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        >"target/smoke-$t.log" 2>&1; then
        failed+=("$t")
        echo "smoke: $t FAILED; last lines of target/smoke-$t.log:"
        tail -n 60 "target/smoke-$t.log"
    else
        grep -E '^Done|stat::number_of_executed_units|stat::average_exec_per_sec' "target/smoke-$t.log" || true
    fi
done

if ((${#failed[@]})); then
    echo "smoke: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)"
    exit 1
fi
echo "smoke: all targets ran ${seconds}s without a crash"
