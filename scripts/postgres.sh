#!/usr/bin/env bash
# A local PostgreSQL for trying replicas on one machine, from Debian's packages (installed
# when missing): `scripts/postgres.sh start DIR` makes a cluster in DIR (once), starts it
# on a Unix socket in DIR (no TCP port), creates the database `kms`, and prints the
# KMS_STORE_URL to use; `scripts/postgres.sh stop DIR` stops it. As root, the cluster
# belongs to the `postgres` user (initdb refuses to run as root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
action=${1:-}; dir=${2:-}
[ -n "$action" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql postgresql-client
fi
bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
as_owner=()
if [ "$(id -u)" = 0 ]; then as_owner=(runuser -u postgres --); fi
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
port=5432
case "$action" in
  start)
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U kms --auth=trust -E UTF8 --no-locale >/dev/null
    fi
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 30 \
      -o "-c listen_addresses='' -c unix_socket_directories='$dir' -c port=$port" start >/dev/null
    psql -h "$dir" -p "$port" -U kms -d postgres -qtc "SELECT 1 FROM pg_database WHERE datname = 'kms'" \
      | grep -q 1 || psql -h "$dir" -p "$port" -U kms -d postgres -qc "CREATE DATABASE kms"
    echo "KMS_STORE_URL='host=$dir port=$port user=kms dbname=kms'"
    ;;
  stop)
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
