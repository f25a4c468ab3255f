//! An HSM-backed key management service: gRPC in front, PKCS#11 behind, an embedded
//! store (redb; or sled) or PostgreSQL for metadata, KEK-wrapped blobs and the audit
//! trail.

pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod domain;
pub mod hsm;
pub mod secret;
pub mod server;
pub mod store;

/// Generated protobuf and gRPC code for `kms.v1`.
pub mod proto {
    tonic::include_proto!("kms.v1");

    /// Encoded descriptors served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");
}
