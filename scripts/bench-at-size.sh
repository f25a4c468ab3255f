#!/usr/bin/env bash
# The README's "At size" figures: a release server on a fresh store (sled, redb, or a
# local PostgreSQL from scripts/postgres.sh), one instance preloaded with KEYS generated root
# keys by `kms bench --preload`, then
#   - at 1 call in flight: GetKey, the first ListKeys page, ListKeys pages from every
#     depth (by page token), CountKeys;
#   - at 64 in flight: the health baseline, WrapKey, and durable CreateKey, in rounds
#     that alternate with a second server on a near-empty store (1,000 keys), with the
#     medians and their ratios (KMS_AT_SIZE_ROUNDS, default 6);
#   - the server's resident memory after the preload and at the end (VmRSS, VmHWM), and
#     the store's size on disk per key (sled, redb: `du` of the database with the server
#     stopped; PostgreSQL: pg_database_size after the preload less before it).
#   - the time `kms backup` takes, then (sled, redb) `kms store compact` and the size on
#     disk after it, and `kms restore` into a new store (KMS_AT_SIZE_RESTORE=0 skips it).
# Usage: scripts/bench-at-size.sh KEYS [redb|sled|postgres] [WORK_DIR]   (WORK_DIR is wiped; redb by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
keys=${1:?usage: $0 KEYS [sled|redb|postgres] [WORK_DIR]}
backend=${2:-redb}
work=${3:-/var/tmp/kms-at-size}
port=${KMS_AT_SIZE_PORT:-50071}
bash scripts/deps.sh >/dev/null
# KMS_AT_SIZE_BIN: another build's binary, to compare two builds on the same machine.
kms=${KMS_AT_SIZE_BIN:-target/release/kms}
if [ -z "${KMS_AT_SIZE_BIN:-}" ]; then
  cargo build --release --locked --bin kms >&2
fi

rm -rf "$work/data"
mkdir -p "$work"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
db_bytes() { :; }
if [ "$backend" = postgres ]; then
  eval "export $(scripts/postgres.sh start "$work/pg")"
  socket="$work/pg"
  db_bytes() { psql -h "$socket" -U kms -d kms_at_size -qtAc "SELECT pg_database_size('kms_at_size')"; }
fi
# Sets `store` to the settings that put a server or a restore on the backend: for
# PostgreSQL, on DATABASE, dropped and made anew.
use_store() { # DATABASE
  case "$backend" in
    redb|sled) store=(KMS_STORE_BACKEND="$backend") ;;
    postgres)
      psql -h "$socket" -U kms -d postgres -qc "DROP DATABASE IF EXISTS $1" >/dev/null
      psql -h "$socket" -U kms -d postgres -qc "CREATE DATABASE $1" >/dev/null
      store=(KMS_STORE_URL="host=$socket port=5432 user=kms dbname=$1") ;;
  esac
}
use_store kms_at_size
server_env=(KMS_DATA_DIR="$work/data" KMS_LISTEN="127.0.0.1:$port" KMS_IMPORT_RSA_POOL_SIZE=0 "${store[@]}")

pid=
serve() {
  env "${server_env[@]}" "$kms" serve >"$work/server-$1.log" 2>&1 &
  pid=$!
  wait_listening "$work/server-$1.log"
  client=(--addr "http://127.0.0.1:$port" --token-file "$work/data/admin.token" --server-pid "$pid")
}
stop() { kill "$pid"; wait "$pid" || true; }
trap 'kill $pid 2>/dev/null || true' EXIT
serve 1
before=$(db_bytes)

echo "== $keys keys on $backend ($(date -u +%FT%TZ), $(git rev-parse --short HEAD), $kms)"
start=$(date +%s)
preload "$keys" big "${client[@]}"
echo "preload: $(( $(date +%s) - start )) s"
echo "after preload: $(grep -E 'VmRSS' /proc/$pid/status | tr -s ' \t' ' ')"
if [ "$backend" = postgres ]; then
  after=$(db_bytes)
  echo "database: $after bytes, $(( (after - before) / keys )) bytes per key"
fi
stop
if [ "$backend" = sled ] || [ "$backend" = redb ]; then
  store_path=$work/data/db
  [ "$backend" = redb ] && store_path=$work/data/kms.redb
  bytes=$(du -sb "$store_path" | cut -f1)
  echo "$backend on disk: $bytes bytes, $(( bytes / keys )) bytes per key (with its creation's audit record)"
fi
serve 2

echo "-- 1 call in flight"
"$kms" bench "${client[@]}" --instance big --scenarios get,list-first,list-deep,count \
  --rounds 3 --seconds 3 --concurrency 1 | grep '^|'
echo "-- 64 calls in flight, interleaved with a server on a near-empty store"
# A second server of the same build and backend, on a fresh store holding 1,000 keys;
# rounds alternate between the two, so a ratio compares like with like on this shared
# machine (one sequential run of each differed by 10-20% from machine noise alone).
use_store kms_at_size_empty
rm -rf "$work/empty"
env KMS_DATA_DIR="$work/empty" KMS_LISTEN="127.0.0.1:$((port + 1))" KMS_IMPORT_RSA_POOL_SIZE=0 \
  "${store[@]}" "$kms" serve >"$work/server-empty.log" 2>&1 &
empty_pid=$!
trap 'kill $pid $empty_pid 2>/dev/null || true' EXIT
wait_listening "$work/server-empty.log"
empty_client=(--addr "http://127.0.0.1:$((port + 1))" --token-file "$work/empty/admin.token" --server-pid "$empty_pid")
preload 1000 big "${empty_client[@]}" 2>/dev/null
rounds=${KMS_AT_SIZE_ROUNDS:-6}
for round in $(seq "$rounds"); do
  for side in full empty; do
    if [ "$side" = full ]; then args=("${client[@]}"); else args=("${empty_client[@]}"); fi
    "$kms" bench "${args[@]}" --instance big --scenarios health,wrap,create \
      --rounds 1 --seconds 3 --concurrency 64 | grep -E '^\| (Health|WrapKey|CreateKey)' |
      sed "s/^/$side /"
  done
done | tee "$work/interleaved.txt"
round_medians "$work/interleaved.txt" full empty "at size" "near empty"
kill "$empty_pid"; wait "$empty_pid" || true
trap 'kill $pid 2>/dev/null || true' EXIT
echo "at the end: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' \t' ' ' | tr '\n' ' ')"
echo "-- kms backup"
start=$(date +%s%N)
"$kms" backup "${client[@]:0:4}" --out "$work/at-size.backup" 2>/dev/null
echo "backup: $(( ($(date +%s%N) - start) / 1000000 )) ms, $(stat -c %s "$work/at-size.backup") bytes"
echo "after the backup: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' \t' ' ' | tr '\n' ' ')"

stop
trap - EXIT
if [ "$backend" = sled ] || [ "$backend" = redb ]; then
  echo "-- kms store compact"
  start=$(date +%s%N)
  "$kms" store compact --data-dir "$work/data" 2>/dev/null
  bytes=$(du -sb "$store_path" | cut -f1)
  echo "compact: $(( ($(date +%s%N) - start) / 1000000 )) ms; $bytes bytes, $(( bytes / keys )) bytes per preloaded key"
fi
if [ "${KMS_AT_SIZE_RESTORE:-1}" = 1 ]; then
echo "-- kms restore (into a new data directory with a copy of the token)"
rm -rf "$work/restored"
mkdir -p "$work/restored"
cp -a "$work/data/softhsm" "$work/restored/"
use_store kms_at_size_restored
start=$(date +%s%N)
env "${store[@]}" "$kms" restore --from "$work/at-size.backup" --data-dir "$work/restored" 2>/dev/null
echo "restore: $(( ($(date +%s%N) - start) / 1000000 )) ms"
fi
if [ "$backend" = postgres ]; then
  scripts/postgres.sh stop "$work/pg"
fi
