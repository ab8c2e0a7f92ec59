//! Generates the ttRPC/protobuf code for `protos/cache.proto` (see `vmfactory-protogen`).

fn main() {
    vmfactory_protogen::generate(&["protos/cache.proto"], "protos");
}
