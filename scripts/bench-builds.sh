#!/usr/bin/env bash
# Compares two builds on this machine: a server of each on its own fresh store of 1,000
# keys, both serving at once, and `kms bench` at 64 in flight alternating between them
# round by round (this machine's speed drifts by 10-20% within minutes, so runs minutes
# apart compare the machine as much as the builds). Prints each round, then the medians,
# the ratio B/A and each server's resident memory at the end.
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
this=target/release/kms

rm -rf "$work"
mkdir -p "$work"
declare -A binary=([A]="$other" [B]="$this") listen=([A]=$port [B]=$((port + 1))) pid=()
trap 'kill "${pid[@]}" 2>/dev/null || true' EXIT
for side in A B; do
  env KMS_DATA_DIR="$work/$side" KMS_LISTEN="127.0.0.1:${listen[$side]}" \
    KMS_IMPORT_RSA_POOL_SIZE=0 KMS_STORE_BACKEND="$backend" \
    "${binary[$side]}" serve >"$work/server-$side.log" 2>&1 &
  pid[$side]=$!
  for _ in $(seq 300); do
    grep -q "listening" "$work/server-$side.log" 2>/dev/null && break
    sleep 0.2
  done
done
client() { # SIDE
  echo --addr "http://127.0.0.1:${listen[$1]}" --token-file "$work/$1/admin.token" \
    --server-pid "${pid[$1]}" --instance bench
}
for side in A B; do
  # shellcheck disable=SC2046
  "$this" bench $(client $side) --preload 1000 --scenarios count --rounds 1 --seconds 1 \
    --warmup-seconds 0 --concurrency 1 >/dev/null 2>&1
done
echo "== A: $other; B: $this ($(git rev-parse --short HEAD)); $backend, $rounds rounds ($(date -u +%FT%TZ))"
for _ in $(seq "$rounds"); do
  for side in A B; do
    # shellcheck disable=SC2046
    "$this" bench $(client $side) --scenarios "$scenarios" --rounds 1 --seconds 3 \
      --concurrency 64 | grep -E '^\| [A-Z]' | grep -v '^| Scenario' | sed "s/^/$side /"
  done
done | tee "$work/rounds.txt"
# Medians over the rounds: ops/s and server CPU per call, then the ratio.
awk -F'|' '
  { side = substr($1, 1, 1); name = $2; gsub(/^ +| +$/, "", name)
    n[side, name]++; ops[side, name, n[side, name]] = $3; cpu[side, name, n[side, name]] = $8 + 0
    names[name] = 1 }
  function median(a, s, k, c,   i, j, t, v) {
    c = n[s, k]; for (i = 1; i <= c; i++) v[i] = a[s, k, i] + 0
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2 }
  END {
    print "| median of rounds | A ops/s | B ops/s | B / A | server CPU/call A / B |"
    print "|---|---:|---:|---:|---:|"
    for (k in names) printf "| %s | %.0f | %.0f | %.2fx | %.0f / %.0f µs |\n", k,
      median(ops, "A", k), median(ops, "B", k), median(ops, "B", k) / median(ops, "A", k),
      median(cpu, "A", k), median(cpu, "B", k)
  }' "$work/rounds.txt"
for side in A B; do
  echo "$side at the end: $(grep -E 'VmRSS|VmHWM' "/proc/${pid[$side]}/status" | tr -s ' \t' ' ' | tr '\n' ' ')"
done
