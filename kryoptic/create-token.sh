#!/usr/bin/env bash
# Creates a Kryoptic token for kms under DIR when absent (building the module first if
# needed), and prints the environment to use it, like softhsm/create-token.sh.
#
#   kryoptic/create-token.sh DIR [LABEL]
set -euo pipefail

dir=${1:?usage: create-token.sh DIR [LABEL]}
label=${2:-kms}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
target=${KMS_KRYOPTIC_TARGET_DIR:-$here/../target/kryoptic}
module="$target/release/libkms_kryoptic_module.so"

if [ ! -e "$module" ]; then
  bash "$here/deps.sh"
  echo "building the Kryoptic PKCS#11 module" >&2
  cargo build --release --quiet --manifest-path "$here/Cargo.toml" --target-dir "$target" >&2
fi

umask 077
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/kryoptic.conf"
for pin in user.pin so.pin; do
  if [ ! -f "$dir/$pin" ]; then
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$pin"
  fi
done
if [ ! -f "$conf" ]; then
  printf '[[slots]]\nslot = 1\ndbtype = "sqlite"\ndbargs = "%s"\n' "$dir/token.sql" > "$conf"
  export KRYOPTIC_CONF="$conf"
  pkcs11-tool --module "$module" --slot 1 --init-token --label "$label" \
    --so-pin "$(cat "$dir/so.pin")" >&2
  pkcs11-tool --module "$module" --slot 1 --login --login-type so \
    --so-pin "$(cat "$dir/so.pin")" --init-pin --pin "$(cat "$dir/user.pin")" >&2
fi

echo "KRYOPTIC_CONF=$conf"
echo "KMS_HSM_MODULE=$module"
echo "KMS_HSM_TOKEN_LABEL=$label"
echo "KMS_HSM_PIN_FILE=$dir/user.pin"
