//! The busybox OCI image the container tests and bench import with `ctr image import`: built
//! locally from Debian's `busybox-static` (no registry), as an OCI image layout tarball.
//!
//! The rootfs is `bin/busybox` with a symlink per applet (`busybox --list-full`),
//! `etc/passwd` and `etc/group` with root, and empty `tmp`, `proc`, `sys`, `dev` and `root`
//! directories; one gzip'd layer. Every mtime is 0 and every owner root, so the same .deb
//! always gives the same bytes (and so the same image digest). Built once, cached under
//! `target/oci/` next to the .deb it came from.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder, Sha256Digest, ANNOTATION_REF_NAME,
};
use sha2::{Digest as _, Sha256};

/// When set, the image tarball to use instead of building one (`cargo xtask test|e2e` set it
/// to the one `cargo xtask oci-image` built).
pub const IMAGE_ENV: &str = "VMFACTORY_OCI_IMAGE";

/// The reference `ctr image import` gives the image (`org.opencontainers.image.ref.name`).
pub const IMAGE_REF: &str = "localhost/vmfactory/busybox:latest";

/// Bumped when the image's layout changes, so cached tarballs are rebuilt.
const FORMAT: u32 = 1;

/// The Debian package the image is made from.
const PACKAGE: &str = "busybox-static";

/// `PATH` in the image's config (the OCI default for Linux).
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the image and its .deb are cached: `target/oci`.
pub fn cache_dir() -> PathBuf {
    crate::workspace_root().join("target/oci")
}

/// Builds `dir/busybox.tar` from the `busybox-static` .deb (downloaded into `dir` with
/// `apt-get download` once) unless it is already built from that .deb; returns its path.
pub fn ensure_image(dir: &Path, quiet: bool) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let deb = fetch_deb(dir)?;
    let out = dir.join("busybox.tar");
    let stamp_path = dir.join("busybox.tar.stamp");
    let deb_name = deb.file_name().unwrap_or_default().to_string_lossy();
    let stamp = format!("format {FORMAT}\n{deb_name}\n");
    if out.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        return Ok(out);
    }
    let unpacked = dir.join("busybox-static.unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let busybox = unpacked.join("bin/busybox");
    let applets = applets(&busybox)?;
    let bytes = fs::read(&busybox).with_context(|| format!("Cannot read {}", busybox.display()))?;
    let image = image_tar(&bytes, &applets)?;
    write_atomically(&out, &image)?;
    write_atomically(&stamp_path, stamp.as_bytes())?;
    let _ = fs::remove_dir_all(&unpacked);
    if !quiet {
        eprintln!(
            "oci: {} ({} applets, {} bytes) from {deb_name}",
            out.display(),
            applets.len(),
            image.len()
        );
    }
    Ok(out)
}

/// The `busybox-static` .deb in `dir`, downloaded when there is none (running `apt-get
/// update` first if apt has no package lists yet).
fn fetch_deb(dir: &Path) -> Result<PathBuf> {
    if let Some(deb) = find_deb(dir)? {
        return Ok(deb);
    }
    let download = || {
        Command::new("apt-get")
            // As root into a root-owned directory: apt's `_apt` sandbox cannot write there.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", PACKAGE])
            .current_dir(dir)
            .status()
    };
    let ok = download().map(|s| s.success()).unwrap_or(false);
    if !ok {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        let status = download().context("Cannot run apt-get download")?;
        ensure!(
            status.success(),
            "apt-get download {PACKAGE} failed ({status})"
        );
    }
    find_deb(dir)?.with_context(|| format!("apt-get download {PACKAGE} left no .deb"))
}

fn find_deb(dir: &Path) -> Result<Option<PathBuf>> {
    let prefix = format!("{PACKAGE}_");
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("Cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

/// Busybox's applets as paths (`bin/sh`, `usr/bin/awk`, ...) from `busybox --list-full`,
/// run on the host (the binary is static); `bin/busybox` itself is left out.
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("Cannot run {}", busybox.display()))?;
    ensure!(
        out.status.success(),
        "{} --list-full failed",
        busybox.display()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "bin/busybox" && !l.contains(".."))
        .map(String::from)
        .collect())
}

/// The OCI image layout tarball of a rootfs made of `busybox` (the binary's bytes) and its
/// `applets` (relative paths, each a symlink to `/bin/busybox`).
pub fn image_tar(busybox: &[u8], applets: &[String]) -> Result<Vec<u8>> {
    let layer = rootfs_tar(busybox, applets)?;
    let diff_id = sha256(&layer);
    let layer_gz = gzip(&layer)?;

    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .env(vec![PATH_ENV.to_string()])
                .cmd(vec!["sh".to_string()])
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()?,
        )
        .build()?;
    let config = json(&config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config)?)
        .layers(vec![descriptor(MediaType::ImageLayerGzip, &layer_gz)?])
        .build()?;
    let manifest = json(&manifest)?;
    let mut manifest_desc = descriptor(MediaType::ImageManifest, &manifest)?;
    manifest_desc.set_annotations(Some(
        [(ANNOTATION_REF_NAME.to_string(), IMAGE_REF.to_string())].into(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    let index = json(&index)?;

    let mut files = Archive::default();
    files.dir("blobs")?;
    files.dir("blobs/sha256")?;
    for blob in [&config, &manifest, &layer_gz] {
        files.file(&format!("blobs/sha256/{}", sha256(blob)), 0o644, blob)?;
    }
    files.file("index.json", 0o644, &index)?;
    files.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    files.finish()
}

/// The layer: the rootfs as an uncompressed tar.
fn rootfs_tar(busybox: &[u8], applets: &[String]) -> Result<Vec<u8>> {
    let mut dirs: Vec<(String, u32)> = [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sbin", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
    ]
    .into_iter()
    .map(|(d, m)| (d.to_string(), m))
    .collect();
    // Any other directory an applet lives in.
    for applet in applets {
        for parent in Path::new(applet).ancestors().skip(1) {
            let p = parent.to_string_lossy().into_owned();
            if !p.is_empty() && !dirs.iter().any(|(d, _)| *d == p) {
                dirs.push((p, 0o755));
            }
        }
    }
    // A parent sorts before its children.
    dirs.sort();
    let mut tar = Archive::default();
    for (dir, mode) in &dirs {
        tar.dir_mode(dir, *mode)?;
    }
    tar.file("bin/busybox", 0o755, busybox)?;
    tar.file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".as_slice(),
    )?;
    tar.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .as_slice(),
    )?;
    let mut applets: Vec<&String> = applets.iter().collect();
    applets.sort();
    applets.dedup();
    for applet in applets {
        tar.symlink(applet, "/bin/busybox")?;
    }
    tar.finish()
}

/// A tar archive whose entries all have mtime 0 and owner root.
struct Archive(tar::Builder<Vec<u8>>);

impl Default for Archive {
    fn default() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Archive")
    }
}

impl Archive {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        self.dir_mode(path, 0o755)
    }

    fn dir_mode(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.0
            .append_data(&mut h, format!("{path}/"), std::io::empty())?;
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data)?;
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target)?;
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>> {
        Ok(self.0.into_inner()?)
    }
}

/// gzip with no name and mtime 0 in its header, so the bytes depend on the input only.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn descriptor(kind: MediaType, blob: &[u8]) -> Result<Descriptor> {
    let digest: Sha256Digest = sha256(blob).parse()?;
    Ok(Descriptor::new(kind, blob.len() as u64, digest))
}

/// JSON with sorted keys (through `serde_json::Value`): annotations are a `HashMap`, whose
/// order would change from run to run.
fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(value)?)?)
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("Cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("Cannot rename to {}", path.display()))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("Cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read as _;

    use super::*;

    fn entries(tar: &[u8]) -> BTreeMap<String, (tar::EntryType, u32, Vec<u8>, Option<String>)> {
        let mut out = BTreeMap::new();
        let mut archive = tar::Archive::new(tar);
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let h = entry.header().clone();
            assert_eq!(h.mtime().expect("mtime"), 0);
            assert_eq!((h.uid().expect("uid"), h.gid().expect("gid")), (0, 0));
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let link = entry
                .link_name()
                .expect("link")
                .map(|l| l.to_string_lossy().into_owned());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("data");
            out.insert(path, (h.entry_type(), h.mode().expect("mode"), data, link));
        }
        out
    }

    fn applets() -> Vec<String> {
        [
            "bin/sh",
            "usr/bin/env",
            "sbin/ip",
            "bin/sh",
            "usr/local/bin/x",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn image_is_reproducible_and_its_digests_match() {
        let a = image_tar(b"\x7fELF busybox", &applets()).expect("image");
        let b = image_tar(b"\x7fELF busybox", &applets()).expect("image");
        assert_eq!(a, b, "two builds differ");

        let files = entries(&a);
        assert_eq!(
            files["oci-layout"].2,
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()
        );
        let index: serde_json::Value =
            serde_json::from_slice(&files["index.json"].2).expect("index");
        let manifest = &index["manifests"][0];
        assert_eq!(manifest["annotations"][ANNOTATION_REF_NAME], IMAGE_REF);
        // Every blob is named by its digest and has the size its descriptor says.
        let blob = |desc: &serde_json::Value| {
            let digest = desc["digest"].as_str().expect("digest");
            let hex = digest.strip_prefix("sha256:").expect("sha256");
            let data = &files[&format!("blobs/sha256/{hex}")].2;
            assert_eq!(sha256(data), hex);
            assert_eq!(desc["size"].as_u64(), Some(data.len() as u64));
            data.clone()
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(manifest)).expect("m");
        assert_eq!(manifest["schemaVersion"], 2);
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&manifest["config"])).expect("config");
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
        assert_eq!(config["config"]["Env"], serde_json::json!([PATH_ENV]));
        assert_eq!(
            (config["os"].as_str(), config["architecture"].as_str()),
            (Some("linux"), Some("amd64"))
        );
        let layer_gz = blob(&manifest["layers"][0]);
        assert_eq!(
            manifest["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let mut layer = Vec::new();
        flate2::read::GzDecoder::new(layer_gz.as_slice())
            .read_to_end(&mut layer)
            .expect("gunzip");
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256(&layer))
        );
    }

    #[test]
    fn rootfs_has_busybox_its_applets_users_and_mount_points() {
        let layer = rootfs_tar(b"bb", &applets()).expect("layer");
        let files = entries(&layer);
        let (kind, mode, data, _) = &files["bin/busybox"];
        assert_eq!(
            (*kind, *mode, data.as_slice()),
            (tar::EntryType::Regular, 0o755, &b"bb"[..])
        );
        for applet in ["bin/sh", "usr/bin/env", "sbin/ip", "usr/local/bin/x"] {
            let (kind, _, _, link) = &files[applet];
            assert_eq!(*kind, tar::EntryType::Symlink, "{applet}");
            assert_eq!(link.as_deref(), Some("/bin/busybox"));
        }
        assert_eq!(files["tmp/"].1, 0o1777);
        for dir in [
            "proc/",
            "sys/",
            "dev/",
            "root/",
            "usr/local/",
            "usr/local/bin/",
        ] {
            assert_eq!(files[dir].0, tar::EntryType::Directory, "{dir}");
        }
        let passwd = String::from_utf8_lossy(&files["etc/passwd"].2).into_owned();
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
        assert!(String::from_utf8_lossy(&files["etc/group"].2).starts_with("root:x:0:"));
        // A directory comes before what it holds.
        let order: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("e")
                    .path()
                    .expect("p")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let pos = |p: &str| order.iter().position(|o| o == p).expect(p);
        assert!(pos("usr/local/") < pos("usr/local/bin/"));
        assert!(pos("usr/local/bin/") < pos("usr/local/bin/x"));
    }
}
