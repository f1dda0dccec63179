//! Compiles `proto/udaconnect/v1/*.proto` with the vendored `protoc`, so no system protoc is needed,
//! and checks that the web console's map library is installed (the binary embeds it from
//! `src/console/node_modules`, which `./dev setup` fills from the lockfile).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=src/console/package-lock.json");
    println!("cargo:rerun-if-changed=src/console/node_modules/leaflet/package.json");
    if !PathBuf::from("src/console/node_modules/leaflet/dist/leaflet.js").exists() {
        return Err(
            "src/console/node_modules/leaflet is missing: the web console embeds it; \
                    run ./dev setup (or `npm ci` in src/console)"
                .into(),
        );
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;

    let dir = PathBuf::from("proto/udaconnect/v1");
    let mut protos = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            protos.push(path);
        }
    }
    protos.sort();
    println!("cargo:rerun-if-changed=proto");
    // The descriptor set serves gRPC reflection (grpcurl without .proto files).
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("udaconnect_v1_descriptor.bin"))
        // Maps (counters by name) in a stable order.
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;
    Ok(())
}
