//! Generates the ttRPC/protobuf code for `protos/*.proto` (see `vmfactory-protogen`).

fn main() {
    vmfactory_protogen::generate(
        &[
            "protos/health.proto",
            "protos/types.proto",
            "protos/agent.proto",
            "protos/diag.proto",
            "protos/oci.proto",
            "protos/workload.proto",
            "protos/template.proto",
        ],
        "protos",
    );
}
