use std::sync::Arc;
use std::time::Duration;

use super::*;

fn mount(kind: &str, source: &str, options: &[&str]) -> RootfsMount {
    RootfsMount {
        kind: kind.into(),
        source: source.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

fn layer(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = root.join(name);
    fs::create_dir_all(&d).expect("layer dir");
    for (f, text) in files {
        let p = d.join(f);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("parent");
        }
        fs::write(p, text).expect("file");
    }
    d
}

fn cache(root: &Path) -> RootfsCache {
    RootfsCache::new(RootfsConfig::new(root))
}

/// The files of an erofs image, extracted with erofs-utils' own reader.
fn extract(image: &Path, into: &Path) {
    let out = std::process::Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(image)
        .output()
        .expect("fsck.erofs runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mounts_name_their_read_only_layers() {
    let rootfs = Path::new("/b/rootfs");
    assert_eq!(
        Layers::from_mounts(&[], rootfs).expect("none"),
        Layers::Dir(rootfs.into())
    );
    let ov = mount(
        "overlay",
        "overlay",
        &["workdir=/w", "upperdir=/u", "lowerdir=/l2:/l1"],
    );
    assert_eq!(
        Layers::from_mounts(&[ov], rootfs).expect("overlay"),
        Layers::Overlay(vec!["/l2".into(), "/l1".into()])
    );
    let one = mount("overlay", "overlay", &["lowerdir=/l1", "upperdir=/u"]);
    assert_eq!(
        Layers::from_mounts(&[one], rootfs).expect("one"),
        Layers::Dir("/l1".into())
    );
    let bind = mount("bind", "/snap/1/fs", &["rbind", "rw"]);
    assert_eq!(
        Layers::from_mounts(&[bind], rootfs).expect("bind"),
        Layers::Dir("/snap/1/fs".into())
    );
    let bad = [
        vec![mount("overlay", "overlay", &["upperdir=/u"])],
        vec![mount("overlay", "overlay", &["lowerdir="])],
        vec![mount("ext4", "/dev/sda", &[])],
        vec![mount("bind", "/a", &[]), mount("bind", "/b", &[])],
    ];
    for m in bad {
        assert!(
            matches!(
                Layers::from_mounts(&m, rootfs),
                Err(RootfsError::Unsupported(_))
            ),
            "{m:?}"
        );
    }
}

#[test]
fn the_key_follows_the_layers_identity_and_order() {
    let t = tempfile::tempdir().expect("tmp");
    let a = layer(t.path(), "a", &[("f", "1")]);
    let b = layer(t.path(), "b", &[("g", "2")]);
    let ab = Layers::Overlay(vec![a.clone(), b.clone()]);
    let k = ab.key().expect("key");
    assert_eq!(k.len(), 32);
    assert_eq!(k, ab.key().expect("same"), "stable");
    assert_ne!(
        k,
        Layers::Overlay(vec![b.clone(), a.clone()])
            .key()
            .expect("ba")
    );
    // A layer replaced by another directory at the same path is another image.
    fs::remove_dir_all(&b).expect("rm");
    layer(t.path(), "b", &[("g", "3")]);
    assert_ne!(k, ab.key().expect("new b"));
    let missing = Layers::Dir(t.path().join("nope"));
    assert!(matches!(missing.key(), Err(RootfsError::Layer { .. })));
}

#[tokio::test]
async fn an_image_is_built_once_and_then_reused() {
    let t = tempfile::tempdir().expect("tmp");
    let d = layer(t.path(), "l", &[("etc/hostname", "box\n"), ("bin/sh", "x")]);
    let c = cache(&t.path().join("run"));
    let first = c.image(&Layers::Dir(d.clone())).await.expect("build");
    assert!(first.built);
    assert_eq!(first.path.parent(), Some(c.dir()));
    let again = c.image(&Layers::Dir(d)).await.expect("hit");
    assert!(!again.built);
    assert_eq!(again.path, first.path);
    let out = t.path().join("out");
    extract(&first.path, &out);
    assert_eq!(
        fs::read_to_string(out.join("etc/hostname")).expect("read"),
        "box\n"
    );
    let names: Vec<_> = fs::read_dir(c.dir())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_requests_build_one_image() {
    let t = tempfile::tempdir().expect("tmp");
    let d = layer(t.path(), "l", &[("a", "a")]);
    let c = Arc::new(cache(&t.path().join("run")));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, d) = (c.clone(), d.clone());
        tasks.push(tokio::spawn(async move { c.image(&Layers::Dir(d)).await }));
    }
    let mut built = 0;
    let mut paths = Vec::new();
    for t in tasks {
        let img = t.await.expect("join").expect("image");
        built += usize::from(img.built);
        paths.push(img.path.clone());
    }
    assert_eq!(built, 1);
    paths.dedup();
    assert_eq!(paths.len(), 1);
}

#[tokio::test]
async fn an_overlay_of_layers_is_imaged_with_the_upper_layer_winning() {
    let t = tempfile::tempdir().expect("tmp");
    let lower = layer(t.path(), "l1", &[("f", "old"), ("only-lower", "1")]);
    let upper = layer(t.path(), "l2", &[("f", "new")]);
    let c = cache(&t.path().join("run"));
    let img = c
        .image(&Layers::Overlay(vec![upper, lower]))
        .await
        .expect("overlay image");
    let out = t.path().join("out");
    extract(&img.path, &out);
    assert_eq!(fs::read_to_string(out.join("f")).expect("f"), "new");
    assert_eq!(fs::read_to_string(out.join("only-lower")).expect("l"), "1");
    // The private mount point is gone.
    let left: Vec<_> = fs::read_dir(c.dir())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().ends_with(".mnt"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_failed_mkfs_leaves_no_image_and_says_why() {
    let t = tempfile::tempdir().expect("tmp");
    let d = layer(t.path(), "l", &[("a", "a")]);
    let mut cfg = RootfsConfig::new(&t.path().join("run"));
    cfg.mkfs = PathBuf::from("false");
    let c = RootfsCache::new(cfg);
    let e = c.image(&Layers::Dir(d.clone())).await.expect_err("fails");
    assert!(matches!(e, RootfsError::Mkfs { .. }), "{e:?}");
    let images: Vec<_> = fs::read_dir(c.dir())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".erofs"))
        .collect();
    assert!(images.is_empty(), "{images:?}");
    let mut cfg = RootfsConfig::new(&t.path().join("run"));
    cfg.mkfs = t.path().join("no-such-mkfs");
    let e = RootfsCache::new(cfg)
        .image(&Layers::Dir(d))
        .await
        .expect_err("missing mkfs");
    assert!(e.to_string().contains("cannot run"), "{e}");
}

#[tokio::test]
async fn the_cache_keeps_the_newest_images_and_any_in_use() {
    let t = tempfile::tempdir().expect("tmp");
    let mut cfg = RootfsConfig::new(&t.path().join("run"));
    cfg.max_images = 2;
    let c = RootfsCache::new(cfg);
    let dirs: Vec<_> = (0..4)
        .map(|n| layer(t.path(), &format!("l{n}"), &[("n", &n.to_string())]))
        .collect();
    // The oldest stays in use; the second is released.
    let held = c.image(&Layers::Dir(dirs[0].clone())).await.expect("0");
    let released = c.image(&Layers::Dir(dirs[1].clone())).await.expect("1");
    let released_path = released.path.clone();
    drop(released);
    // Distinct mtimes, so "newest" is well defined.
    for (n, d) in dirs[2..].iter().enumerate() {
        std::thread::sleep(Duration::from_millis(20 * (n as u64 + 1)));
        drop(c.image(&Layers::Dir(d.clone())).await.expect("new"));
    }
    assert!(held.path.exists(), "an image in use is kept");
    assert!(!released_path.exists(), "an old unused image is pruned");
    let count = fs::read_dir(c.dir())
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .map(|e| e.path().extension().is_some_and(|x| x == "erofs"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(count, 3, "two newest plus the one in use");
}

#[tokio::test]
async fn clear_removes_every_image_not_in_use() {
    let t = tempfile::tempdir().expect("tmp");
    let c = cache(&t.path().join("run"));
    let a = layer(t.path(), "a", &[("a", "a")]);
    let b = layer(t.path(), "b", &[("b", "b")]);
    let held = c.image(&Layers::Dir(a)).await.expect("a");
    drop(c.image(&Layers::Dir(b)).await.expect("b"));
    assert_eq!(c.clear(), 1, "the image in use stays");
    assert!(held.path.exists());
    drop(held);
    assert_eq!(c.clear(), 0);
    // Nothing left, not even the lock files or the directory itself.
    let left: Vec<_> = fs::read_dir(c.dir())
        .map(|d| d.map(|e| e.expect("entry").file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!c.dir().exists(), "the empty cache directory is removed");
}
