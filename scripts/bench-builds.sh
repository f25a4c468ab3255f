#!/usr/bin/env bash
# Compares two builds on this machine: a server of each on its own fresh store of 1,000
# keys, both serving at once, and `kms bench` at 64 in flight alternating between them
# round by round (this machine's speed drifts by 10-20% within minutes, so runs minutes
# apart compare the machine as much as the builds). Prints each round, then the medians,
# B as a percentage of A, and each server's resident memory at the end.
# Usage: scripts/bench-builds.sh OTHER_KMS_BINARY [redb|sled] [ROUNDS] [SCENARIOS]
#   A is OTHER_KMS_BINARY, B this checkout's release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
other=${1:?usage: $0 OTHER_KMS_BINARY [redb|sled] [ROUNDS] [SCENARIOS]}
backend=${2:-redb}
rounds=${3:-8}
scenarios=${4:-health,wrap,create}
work=${KMS_BUILDS_WORK:-/var/tmp/kms-builds}
port=${KMS_BUILDS_PORT:-50061}
bash scripts/deps.sh >/dev/null
cargo build --release --locked --bin kms >&2
kms=target/release/kms
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

rm -rf "$work"
mkdir -p "$work"
declare -A binary=([A]="$other" [B]="$kms") listen=([A]=$port [B]=$((port + 1))) pid=()
trap 'kill "${pid[@]}" 2>/dev/null || true' EXIT
for side in A B; do
  env KMS_DATA_DIR="$work/$side" KMS_LISTEN="127.0.0.1:${listen[$side]}" \
    KMS_IMPORT_RSA_POOL_SIZE=0 KMS_STORE_BACKEND="$backend" \
    "${binary[$side]}" serve >"$work/server-$side.log" 2>&1 &
  pid[$side]=$!
  wait_listening "$work/server-$side.log"
done
client() { # SIDE
  echo --addr "http://127.0.0.1:${listen[$1]}" --token-file "$work/$1/admin.token" \
    --server-pid "${pid[$1]}"
}
for side in A B; do
  # shellcheck disable=SC2046
  preload 1000 bench $(client $side) 2>/dev/null
done
echo "== A: $other; B: $kms ($(git rev-parse --short HEAD)); $backend, $rounds rounds ($(date -u +%FT%TZ))"
for _ in $(seq "$rounds"); do
  for side in A B; do
    # shellcheck disable=SC2046
    "$kms" bench $(client $side) --instance bench --scenarios "$scenarios" --rounds 1 --seconds 3 \
      --concurrency 64 | grep -E '^\| [A-Z]' | grep -v '^| Scenario' | sed "s/^/$side /"
  done
done | tee "$work/rounds.txt"
round_medians "$work/rounds.txt" B A "B (this build)" "A"
for side in A B; do
  echo "$side at the end: $(grep -E 'VmRSS|VmHWM' "/proc/${pid[$side]}/status" | tr -s ' \t' ' ' | tr '\n' ' ')"
done
