#!/usr/bin/env python3
"""The client half of key import, done with Python's `cryptography` package, so the
tests check the service's format against an implementation this project did not write.

Reads one JSON object on stdin (all binary values hex):
  public_key  DER SubjectPublicKeyInfo from GetImportToken / GetParametersForImport
  hash        "sha1" or "sha256" (RSA-OAEP hash and MGF1 hash, empty label)
  material    the key material to import
  nonce       optional: the import token's nonce, AES-GCM encrypted under `nonce_key`
  nonce_key   optional: defaults to `material`
Writes {"encrypted_material", "iv", "encrypted_nonce"} (hex) on stdout.
With {"generate_rsa": bits} instead, writes {"public_key"} of a fresh unrelated key.
"""
import json
import os
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def main():
    request = json.load(sys.stdin)
    if "generate_rsa" in request:
        key = rsa.generate_private_key(public_exponent=65537, key_size=request["generate_rsa"])
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        json.dump({"public_key": der.hex()}, sys.stdout)
        return
    public_key = serialization.load_der_public_key(bytes.fromhex(request["public_key"]))
    digest = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}[request["hash"]]
    material = bytes.fromhex(request["material"])
    out = {
        "key_size": public_key.key_size,
        "encrypted_material": public_key.encrypt(
            material,
            padding.OAEP(mgf=padding.MGF1(algorithm=digest()), algorithm=digest(), label=None),
        ).hex(),
    }
    if "nonce" in request:
        iv = os.urandom(12)
        nonce_key = bytes.fromhex(request.get("nonce_key", request["material"]))
        out["iv"] = iv.hex()
        out["encrypted_nonce"] = AESGCM(nonce_key).encrypt(
            iv, bytes.fromhex(request["nonce"]), None
        ).hex()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
