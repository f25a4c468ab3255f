#!/usr/bin/env bash
# Debian packages needed to build the Kryoptic module and initialise its tokens.
set -euo pipefail
missing=()
for pkg in libclang-dev pkg-config libsqlite3-dev libssl-dev opensc; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
