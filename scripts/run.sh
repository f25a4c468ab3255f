#!/usr/bin/env bash
# Sets up and runs kms on the embedded default: a SoftHSM token and the redb database
# under ./kms-data (or $KMS_DATA_DIR), created when absent, listening on
# 127.0.0.1:50051 (or $KMS_LISTEN). Extra arguments go to `kms serve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/deps.sh
cargo build --release --locked
exec ./target/release/kms serve "$@"
