//! Compiles `proto/` with a protoc shipped by crates.io (no system protoc needed) and
//! writes the file descriptor set that the reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        // Undecodable request bodies are INVALID_ARGUMENT (src/api/codec.rs).
        .codec_path("crate::api::codec::StrictCodec")
        .file_descriptor_set_path(out_dir.join("kms_descriptor.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from("proto/kms/v1/kms.proto")],
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
