//! Compiles `pipeline/v1/*.proto` with `protox` (pure Rust, so no system `protoc`) and generates
//! the prost messages and tonic services into `OUT_DIR`, with the encoded file descriptor set
//! (`pipeline_descriptor.bin`) that the server's reflection service hands out.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["pipeline/v1/pipeline.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    // The descriptors themselves, for the server's reflection service (`grpcurl list`).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("pipeline_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Payloads (bundles, logs) as `bytes::Bytes`: shared, not copied.
        .bytes(".pipeline.v1")
        // Small per-call buffers: a runner keeps two calls open for its whole life.
        .codec_path("crate::codec::CompactCodec")
        .compile_fds(fds)?;
    Ok(())
}
