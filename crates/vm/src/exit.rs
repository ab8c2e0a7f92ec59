//! Ending a wait on a VM as soon as its hypervisor exits: the helpers every wait of this
//! crate on the guest (the agent's readiness and calls, the proxy's console) runs under, and
//! that `Vm::unless_exited` (in `ops.rs`) offers for callers' own waits. The hypervisor's own
//! operations end themselves (see [`Hypervisor::exited`]).

use std::future::Future;
use std::time::Duration;

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

/// Agent call `op` of VM `id`: its error named with `op`, and ended at once by QEMU's exit
/// ([`watched`]) when the hypervisor `hv` is at hand. Without it (a VM another process holds)
/// the agent connection closing as QEMU exits ends the call instead.
pub(crate) async fn agent_call<T>(
    id: &str,
    hv: Option<&dyn Hypervisor>,
    op: &'static str,
    call: impl Future<Output = vmfactory_agent::Result<T>>,
) -> Result<T> {
    let call = async { call.await.map_err(|e| Error::agent(id, op, e)) };
    match hv {
        Some(hv) => watched(id, hv, op, call).await,
        None => call.await,
    }
}

/// How long [`watched`] waits for the hypervisor's status after a failed wait. A live QEMU
/// answers in milliseconds and an exited one at once; one whose monitor hangs (seen on a clone
/// of a corrupt template) must not add QMP's 30 s command timeout to the failure.
const STATUS_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

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
        Err(e) if e.hypervisor_exit().is_none() => {
            match tokio::time::timeout(STATUS_CHECK_TIMEOUT, hv.status()).await {
                Ok(Err(status)) => match Error::hv(id, op, status) {
                    exited @ Error::HypervisorExited { .. } => Err(exited),
                    _ => Err(e),
                },
                Ok(Ok(_)) | Err(_) => Err(e),
            }
        }
        out => out,
    }
}
