//! Ending a wait on a VM as soon as its hypervisor exits: the two helpers every wait of this
//! crate on the guest (the agent's readiness and calls, the proxy's console) runs under, and
//! that `Vm::unless_exited` (in `ops.rs`) offers for callers' own waits. The hypervisor's own
//! operations end themselves (see [`Hypervisor::exited`]).

use std::future::Future;

use vmfactory_hypervisor::Hypervisor;

use crate::error::{Error, Result};

/// Runs `fut` unless `hv` exits first ([`Error::HypervisorExited`] for `op`).
pub(crate) async fn unless_exited<T>(
    id: &str,
    hv: &dyn Hypervisor,
    op: &'static str,
    fut: impl Future<Output = T>,
) -> Result<T> {
    tokio::select! {
        biased;
        exited = hv.exited() => Err(Error::hv(id, op, exited)),
        out = fut => Ok(out),
    }
}

/// [`unless_exited`] for a fallible wait on the guest. The guest's channels close as QEMU
/// exits, a moment before its exit is known: a failure is checked against the hypervisor
/// (whose status fails with the exit if QEMU is gone) and reported as the exit if it was one.
pub(crate) async fn watched<T>(
    id: &str,
    hv: &dyn Hypervisor,
    op: &'static str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match unless_exited(id, hv, op, fut).await? {
        Err(e) if e.hypervisor_exit().is_none() => match hv.status().await {
            Err(status) => match Error::hv(id, op, status) {
                exited @ Error::HypervisorExited { .. } => Err(exited),
                _ => Err(e),
            },
            Ok(_) => Err(e),
        },
        out => out,
    }
}
