//! Ownership across processes: templates made once by concurrent makers, and never removed
//! while a factory uses them or clones map them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmfactory_persist::OpLock;

use super::error::TemplateError;
use super::factory::TemplateFactory;
use super::metadata::{MEMORY_FILE, METADATA_FILE};
use crate::base::FactoryBase;
use vmfactory_vm::FakeBackends;

use crate::testing::FakeHost;

async fn new_template(
    b: &Arc<FakeBackends>,
    host: &Arc<FakeHost>,
) -> Result<TemplateFactory, TemplateError> {
    TemplateFactory::new_with(&b.config(), b.template_path(), b.clone(), host.clone()).await
}

/// Maps `file` privately in this process, as a clone's QEMU maps the template memory.
struct Mapped(std::ptr::NonNull<std::ffi::c_void>, usize);

impl Mapped {
    fn new(file: &Path) -> Self {
        let f = std::fs::File::open(file).expect("open");
        let len = 4096;
        // SAFETY: a private read-only mapping of a test file nobody changes while mapped;
        // unmapped on drop.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).expect("size"),
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
                &f,
                0,
            )
        }
        .expect("mmap");
        Self(addr, len)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, no longer used.
        unsafe { nix::sys::mman::munmap(self.0, self.1) }.expect("munmap");
    }
}

#[tokio::test]
async fn concurrent_news_make_one_template_and_both_use_it() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    b.set_boot_delay(Duration::from_millis(200));
    let (t1, t2) = tokio::join!(new_template(&b, &host), new_template(&b, &host));
    let (t1, t2) = (t1.expect("first"), t2.expect("second"));
    assert_eq!(b.ids_where(|c| c.saves_template()).len(), 1, "made once");
    assert_eq!(host.depth(&b.template_path()), 1, "mounted once");
    t2.close().await.expect("close");
    assert!(
        b.template_path().exists(),
        "the other factory still uses it"
    );
    t1.close().await.expect("close");
    assert!(!b.template_path().exists(), "the last owner out removes it");
}

#[tokio::test]
async fn destroy_refuses_a_used_or_mapped_template_before_touching_it() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let path = b.template_path();
    let fetched = {
        let t = new_template(&b, &host).await.expect("template");
        // `init` without a cache: the maker exits, the template stays.
        t.lock.lock().await.take().expect("held").release().await;
        TemplateFactory::fetch_with(&b.config(), &path, b.clone(), host.clone())
            .await
            .expect("fetch")
    };
    let files = crate::testing::template_files(&path);
    match TemplateFactory::destroy(&path, host.as_ref()).await {
        Err(TemplateError::Busy { source, .. }) => {
            assert!(source.to_string().contains(&std::process::id().to_string()));
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(files.iter().all(|f| f.exists()), "untouched");
    fetched.close().await.expect("close");

    let clone = Mapped::new(&files[0]);
    match TemplateFactory::destroy(&path, host.as_ref()).await {
        Err(TemplateError::InUse { pids, .. }) => assert_eq!(pids, [std::process::id()]),
        other => panic!("expected InUse, got {other:?}"),
    }
    assert!(files.iter().all(|f| f.exists()), "untouched");
    assert_eq!(host.depth(&path), 1);
    drop(clone);
    TemplateFactory::destroy(&path, host.as_ref())
        .await
        .expect("removed once nothing uses it");
    assert!(!path.exists() && host.depth(&path) == 0);
    assert!(!OpLock::file_for(&path).exists(), "no lock file left");
}

#[tokio::test]
async fn an_owner_closing_under_live_clones_keeps_the_template_and_succeeds() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let path = b.template_path();
    let t = new_template(&b, &host).await.expect("template");
    let clone = Mapped::new(&path.join(MEMORY_FILE));
    t.close().await.expect("closing succeeds");
    assert!(
        path.join(METADATA_FILE).exists(),
        "kept whole for the clone"
    );
    drop(clone);
    TemplateFactory::destroy(&path, host.as_ref())
        .await
        .expect("destroy once the clone is gone");
    assert!(!path.exists());
}

#[tokio::test]
async fn new_makes_the_parent_of_a_template_path_on_a_fresh_host() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let path = b.root().join("fresh/vm/template");
    let t = TemplateFactory::new_with(&b.config(), &path, b.clone(), host.clone())
        .await
        .expect("template under a parent that did not exist");
    t.close().await.expect("close");
    assert!(!path.exists() && !OpLock::file_for(&path).exists());
    TemplateFactory::destroy(&b.root().join("none/template"), host.as_ref())
        .await
        .expect("nothing to destroy");
    assert!(!b.root().join("none").exists(), "destroy creates nothing");
}
