//! The VM abstraction of vmfactory: a hypervisor, an agent, a proxy and persisted state wired
//! together (the Rust successor of Kata 1.x `virtcontainers/vm.go`).
//!
//! Status: skeleton. The lifecycle (`Vm::new`, pause, save, resume, stop, hotplug, reseed,
//! time sync, wire form) is tracked by issue 4 and not implemented yet; this crate exports
//! nothing so that no caller can mistake it for working code.
