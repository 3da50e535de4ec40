//! Compiles `pipeline/v1/*.proto` with `protox` (pure Rust, so no system `protoc`) and generates
//! the prost messages and tonic services into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["pipeline/v1/pipeline.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
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
