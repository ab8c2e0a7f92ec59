//! Templates on vsock: no re-listen wait (the guest's vsock listener never closes), and every
//! clone reached at a CID of its own.

use std::collections::HashSet;
use std::sync::Arc;

use vmfactory_vm::{AgentChannel, AgentUrl, FakeBackends, Vm};

use super::factory::TemplateFactory;
use crate::base::FactoryBase;
use crate::testing::FakeHost;

#[tokio::test]
async fn a_vsock_template_is_saved_without_a_relisten_and_clones_get_their_own_cids() {
    let b = Arc::new(FakeBackends::new());
    // No console line comes: a wait for one would fail at the ready timeout (200 ms).
    b.set_relisten(false);
    let host = Arc::new(FakeHost::default());
    let mut cfg = b.config();
    cfg.hypervisor.agent_channel = AgentChannel::Vsock { guest_cid: None };
    let t = TemplateFactory::new_with(&cfg, b.template_path(), b.clone(), host.clone())
        .await
        .expect("a template without a re-listen wait");
    let tpl = b.ids_where(|c| c.saves_template());
    let tpl_url = b.agent_urls()[0].clone();
    assert!(matches!(tpl_url, AgentUrl::Vsock { .. }), "{tpl_url}");
    assert_eq!(tpl.len(), 1);

    let mut clones: Vec<Vm> = Vec::new();
    for _ in 0..3 {
        let clone = t.get_base_vm(t.config()).await.expect("clone");
        clones.push(clone);
    }
    let urls: HashSet<AgentUrl> = clones.iter().map(Vm::agent_url).collect();
    assert_eq!(urls.len(), 3, "one CID per clone: {urls:?}");
    assert!(
        urls.iter()
            .all(|u| matches!(u, AgentUrl::Vsock { port: 1024, .. })),
        "{urls:?}"
    );
    for clone in &clones {
        let cid = clone.hypervisor().agent_endpoint();
        assert_eq!(
            cid.map(|e| vmfactory_vm::agent_url(&e)),
            Some(clone.agent_url()),
            "the agent dials the CID the clone's QEMU holds"
        );
        clone.stop().await.expect("stop");
    }
    t.close().await.expect("close");
    assert_eq!(b.live().await, 0);
}
