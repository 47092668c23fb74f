//! Compiles the `.proto` files with protox (pure Rust, no `protoc`) and
//! generates prost messages and tonic services from the descriptors.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/strait/tunnel/v1/tunnel.proto",
        "proto/strait/peer/v1/peer.proto",
        "proto/strait/destination/v1/destination.proto",
        "proto/strait/identity/v1/identity.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
