//! `containerd-shim-vmfactory-v2`: containerd starts it as `io.containerd.vmfactory.v2`.

use vmfactory_shim::{shim, ShimSetup, VmfactoryShim, RUNTIME_ID};

/// The setup of this node: with the `vm` feature, VMs from the factory the environment names
/// (`vmfactory_shim::vm_sandbox::FactoryProvider::from_env`); without it, none.
fn setup() -> ShimSetup {
    #[cfg(feature = "vm")]
    {
        let provider = vmfactory_shim::vm_sandbox::FactoryProvider::from_env();
        let rootfs = vmfactory_shim::RootfsConfig::new(&provider.run_root());
        ShimSetup {
            provider: std::sync::Arc::new(provider),
            rootfs,
        }
    }
    #[cfg(not(feature = "vm"))]
    {
        use std::path::PathBuf;
        let run_root = std::env::var_os("VMFACTORY_RUN_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(vmfactory_shim::DEFAULT_RUN_ROOT));
        let mut s = ShimSetup::unsupported();
        s.rootfs = vmfactory_shim::RootfsConfig::new(&run_root);
        s
    }
}

#[tokio::main]
async fn main() {
    shim::set_setup(setup());
    containerd_shim::asynchronous::run::<VmfactoryShim>(RUNTIME_ID, None).await;
}
