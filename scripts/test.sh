#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that start the real
# server against fresh tokens in temporary directories — first SoftHSMv2 on the
# embedded default (redb), then on sled, then on PostgreSQL (a throwaway cluster the
# tests start), then Kryoptic (a second soft token, built from crates.io) on redb.
# KMS_TEST_TOKENS limits the tokens (KMS_TEST_TOKENS=softhsm), KMS_TEST_STORES the
# stores of the SoftHSM pass (KMS_TEST_STORES=redb). Extra arguments go to `cargo
# test`. The wire fuzzer sends 100,000 requests in the first pass and 20,000 in the
# others (KMS_FUZZ_REQUESTS sets all passes; its documented long run is 1,000,000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tokens=${KMS_TEST_TOKENS:-softhsm kryoptic}
stores=${KMS_TEST_STORES:-redb sled postgres}
bash scripts/deps.sh --test
for token in $tokens; do
  echo "== tests against $token" >&2
  case "$token" in
    softhsm)
      for store in $stores; do
        echo "== tests against softhsm on $store" >&2
        case "$store" in
          redb) KMS_FUZZ_REQUESTS=${KMS_FUZZ_REQUESTS:-100000} KMS_TEST_TOKEN=softhsm \
                  cargo test --locked --workspace --all-targets "$@" ;;
          sled) KMS_FUZZ_REQUESTS=${KMS_FUZZ_REQUESTS:-20000} KMS_TEST_TOKEN=softhsm \
                  KMS_TEST_STORE=sled cargo test --locked --tests "$@" ;;
          postgres) KMS_FUZZ_REQUESTS=${KMS_FUZZ_REQUESTS:-20000} KMS_TEST_TOKEN=softhsm \
                  KMS_TEST_STORE=postgres cargo test --locked --tests "$@" ;;
          *) echo "unknown store $store (redb, sled or postgres)" >&2; exit 2 ;;
        esac
      done
      ;;
    kryoptic)
      bash kryoptic/deps.sh
      # Build the module once up front rather than inside a test's time.
      scratch=$(mktemp -d)
      bash kryoptic/create-token.sh "$scratch" >/dev/null
      rm -rf "$scratch"
      KMS_FUZZ_REQUESTS=${KMS_FUZZ_REQUESTS:-20000} KMS_TEST_TOKEN=kryoptic \
        cargo test --locked --tests "$@"
      ;;
    *)
      echo "unknown token $token (softhsm or kryoptic)" >&2
      exit 2
      ;;
  esac
done
