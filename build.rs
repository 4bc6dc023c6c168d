//! Generates the CSI and berth gRPC code from proto/ with a pure-Rust protobuf compiler,
//! so a build needs neither a system `protoc` nor the network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "csi.proto",
            "berth/agent/v1/agent.proto",
            "berth/admin/v1/admin.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        // Chunk data as `Bytes`: the receiver takes it out of the HTTP/2 buffer without a
        // copy, and the sender hands over the buffer it read into.
        .bytes(".berth.agent.v1.Chunk.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
