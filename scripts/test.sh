#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that start the real
# server against fresh SoftHSM tokens in temporary directories.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/deps.sh
cargo test --locked --all-targets "$@"
