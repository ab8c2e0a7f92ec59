//! The factories of vmfactory: direct, template and cache, `get_vm`, and the VM-cache server
//! and client (the Rust successor of Kata 1.x `virtcontainers/factory`).
//!
//! Status: skeleton. The factories are tracked by issue 5 and not implemented yet; this crate
//! exports nothing so that no caller can mistake it for working code.
