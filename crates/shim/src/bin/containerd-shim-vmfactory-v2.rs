//! `containerd-shim-vmfactory-v2`: containerd starts it as `io.containerd.vmfactory.v2`.

use std::sync::Arc;

use vmfactory_shim::sandbox::{SandboxError, SandboxProvider};
use vmfactory_shim::{node, shim, ShimSetup, VmfactoryShim, RUNTIME_ID};

/// The node's setup: VMs from the factory its configuration names, images under
/// its run root. A configuration that does not load refuses every Create with its error.
async fn setup() -> ShimSetup {
    let settings = match node::load(node::config_from_env().as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            return ShimSetup::refusing(SandboxError::Invalid(format!(
                "Bad vmfactory configuration: {}",
                vmfactory_shim::status::one_line(&e)
            )));
        }
    };
    let rootfs = node::rootfs_config(&settings);
    let provider: Arc<dyn SandboxProvider> =
        Arc::new(vmfactory_shim::vm_sandbox::FactoryProvider::new(settings));
    ShimSetup { provider, rootfs }
}

#[tokio::main]
async fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    // Before the setup, so a bad configuration is logged too.
    vmfactory_shim::logging::init(&args);
    shim::set_setup(setup().await);
    let config = containerd_shim::Config {
        no_setup_logger: true,
        // Its reaper waits for any child (waitpid(-1)) and took the exits tokio waits for:
        // mkfs.erofs and QEMU failed with ECHILD. Our children are all tokio's, the
        // containers' processes are in the VM: no reaper, and no subreaper whose orphans
        // nobody would reap.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<VmfactoryShim>(RUNTIME_ID, Some(config)).await;
}
