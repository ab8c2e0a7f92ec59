//! Generates the ttRPC/protobuf code for `protos/cache.proto` into `$OUT_DIR/protos`, then strips
//! the inner attributes and inner doc comments that `include!` cannot take (see
//! src/cache_service/protocols.rs). Same approach as the agent crate's build script.

use std::path::{Path, PathBuf};
use std::{env, fs};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: [&str; 1] = ["protos/cache.proto"];

fn main() {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("protos");
    fs::create_dir_all(&out).expect("create OUT_DIR/protos");
    Codegen::new()
        .out_dir(&out)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc codegen of protos/cache.proto");
    for entry in fs::read_dir(&out).expect("read OUT_DIR/protos") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            strip_inner_attributes(&path);
        }
    }
}

fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path).expect("read generated file");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("#![") || t.starts_with("//!"))
        })
        .collect();
    fs::write(path, kept.join("\n")).expect("write generated file");
}
