#!/usr/bin/env bash
# Creates a SoftHSMv2 token for kms under DIR when absent, and prints the environment
# to use it. Idempotent: an existing token with the label is left alone.
#
#   softhsm/create-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf (from softhsm2.conf.template), DIR/tokens/, and random PINs
# in DIR/user.pin and DIR/so.pin (mode 0600). Installs softhsm2 with apt-get when the
# module is missing and the caller is root.
set -euo pipefail

dir=${1:?usage: create-token.sh DIR [LABEL]}
label=${2:-kms}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
module=${KMS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -e "$module" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing softhsm2" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
  else
    echo "softhsm2 is not installed (apt-get install softhsm2)" >&2
    exit 1
  fi
fi

umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf="$dir/softhsm2.conf"
if [ ! -f "$conf" ]; then
  sed "s|@TOKEN_DIR@|$dir/tokens|" "$here/softhsm2.conf.template" > "$conf"
fi
for pin in user.pin so.pin; do
  if [ ! -f "$dir/$pin" ]; then
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$pin"
  fi
done

export SOFTHSM2_CONF="$conf"
if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:[[:space:]]*$label[[:space:]]*$"; then
  softhsm2-util --init-token --free --label "$label" \
    --pin "$(cat "$dir/user.pin")" --so-pin "$(cat "$dir/so.pin")" >&2
fi

echo "SOFTHSM2_CONF=$conf"
echo "KMS_HSM_MODULE=$module"
echo "KMS_HSM_TOKEN_LABEL=$label"
echo "KMS_HSM_PIN_FILE=$dir/user.pin"
