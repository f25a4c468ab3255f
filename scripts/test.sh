#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that start the real
# server against fresh tokens in temporary directories — first SoftHSMv2, then
# Kryoptic (a second soft token, built from crates.io). KMS_TEST_TOKENS limits the
# tokens, e.g. KMS_TEST_TOKENS=softhsm. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tokens=${KMS_TEST_TOKENS:-softhsm kryoptic}
bash scripts/deps.sh --test
for token in $tokens; do
  echo "== tests against $token" >&2
  case "$token" in
    softhsm)
      KMS_TEST_TOKEN=softhsm cargo test --locked --all-targets "$@"
      ;;
    kryoptic)
      bash kryoptic/deps.sh
      # Build the module once up front rather than inside a test's time.
      scratch=$(mktemp -d)
      bash kryoptic/create-token.sh "$scratch" >/dev/null
      rm -rf "$scratch"
      KMS_TEST_TOKEN=kryoptic cargo test --locked --tests "$@"
      ;;
    *)
      echo "unknown token $token (softhsm or kryoptic)" >&2
      exit 2
      ;;
  esac
done
