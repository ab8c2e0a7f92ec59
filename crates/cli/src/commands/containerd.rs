//! `vmfactory containerd install`: make containerd able to run OCI containers in vmfactory
//! VMs. Puts the shim binary (`containerd-shim-vmfactory-v2`, which containerd finds on its
//! `PATH`) into a bin directory and registers the runtime `io.containerd.vmfactory.v2` under
//! the CRI plugin's runtimes (handler `vmfactory`, what a Kubernetes RuntimeClass names) in
//! containerd's config, editing the file in place with `toml_edit` so its comments and layout
//! stay. Idempotent; both files are staged before either is replaced, so a failure changes
//! nothing; the config's previous text is kept in `<config>.vmfactory-backup`.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use clap::Subcommand;
use toml_edit::{DocumentMut, Item, Table};

use crate::failure::{CmdResult, Failure};

/// The shim binary's name: containerd runs runtime `io.containerd.NAME.v2` as
/// `containerd-shim-NAME-v2`.
pub const SHIM_BINARY: &str = "containerd-shim-vmfactory-v2";

/// The runtime type containerd (and `ctr run --runtime`) knows the shim by.
pub const RUNTIME_TYPE: &str = "io.containerd.vmfactory.v2";

/// The CRI runtime handler (a RuntimeClass's `handler`).
pub const HANDLER: &str = "vmfactory";

/// Where the CRI plugin's runtimes live in a version 2 config.
const RUNTIMES_PATH: [&str; 4] = [
    "plugins",
    "io.containerd.grpc.v1.cri",
    "containerd",
    "runtimes",
];

/// `vmfactory containerd ...`.
#[derive(Debug, Subcommand)]
pub enum ContainerdCommand {
    /// Install the shim into a bin directory and register `io.containerd.vmfactory.v2`
    /// (handler `vmfactory`) in containerd's config; then restart containerd. Idempotent.
    Install {
        /// containerd's configuration file (created if missing; must be `version = 2`).
        #[arg(
            long = "containerd-config",
            value_name = "PATH",
            default_value = "/etc/containerd/config.toml"
        )]
        containerd_config: PathBuf,
        /// Where to put the shim: a directory on containerd's `PATH`.
        #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// The shim binary to install [default: `containerd-shim-vmfactory-v2` next to this
        /// `vmfactory` binary].
        #[arg(long, value_name = "PATH")]
        shim: Option<PathBuf>,
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs a `containerd` subcommand (file work, so on a blocking thread).
pub async fn run(cmd: ContainerdCommand) -> CmdResult {
    let ContainerdCommand::Install {
        containerd_config,
        bin_dir,
        shim,
        dry_run,
    } = cmd;
    let req = Install {
        config: containerd_config,
        bin_dir,
        shim,
        dry_run,
    };
    tokio::task::spawn_blocking(move || install(&req))
        .await
        .map_err(|e| Failure::from(anyhow!(e).context("The install task failed")))?
}

/// What `install` was asked for.
#[derive(Debug)]
struct Install {
    config: PathBuf,
    bin_dir: PathBuf,
    shim: Option<PathBuf>,
    dry_run: bool,
}

fn install(req: &Install) -> CmdResult {
    // A symlinked config is edited where it points, not replaced by a file.
    let resolved;
    let req = match fs::canonicalize(&req.config) {
        Ok(real) if real != req.config => {
            resolved = Install {
                config: real,
                bin_dir: req.bin_dir.clone(),
                shim: req.shim.clone(),
                dry_run: req.dry_run,
            };
            &resolved
        }
        _ => req,
    };
    // Everything that can be refused is checked before anything is written.
    let source = match &req.shim {
        Some(path) => path.clone(),
        None => default_shim().map_err(Failure::usage)?,
    };
    let shim = fs::read(&source)
        .with_context(|| format!("Cannot read the shim binary {}", source.display()))
        .map_err(Failure::usage)?;
    let target = req.bin_dir.join(SHIM_BINARY);
    let shim_changed = fs::read(&target).map_or(true, |old| old != shim);

    let old_text = match fs::read_to_string(&req.config) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("Cannot read {}", req.config.display()))
                .into())
        }
    };
    let new_text = register(old_text.as_deref().unwrap_or(""))
        .with_context(|| format!("Cannot register the runtime in {}", req.config.display()))
        .map_err(Failure::usage)?;
    let config_changed = old_text.as_deref() != Some(new_text.as_str());
    if let Some(text) = &old_text {
        if cri_disabled(text) {
            tracing::warn!(
                "{} disables the CRI plugin: Kubernetes cannot use the runtime until it is \
                 enabled (ctr --runtime {RUNTIME_TYPE} works without it)",
                req.config.display()
            );
        }
    }

    let verb = if req.dry_run {
        "Would install"
    } else {
        "Installed"
    };
    if req.dry_run {
        report(req, &target, shim_changed, config_changed, verb);
        if config_changed {
            println!("--- {} would become:", req.config.display());
            print!("{new_text}");
        }
        return Ok(());
    }

    // Stage both files, then put them in place.
    let staged_shim = if shim_changed {
        Some(stage(&target, &shim, 0o755)?)
    } else {
        None
    };
    let staged_config = if config_changed {
        let mode = fs::metadata(&req.config).map_or(0o644, |m| m.permissions().mode() & 0o7777);
        match stage(&req.config, new_text.as_bytes(), mode) {
            Ok(staged) => Some(staged),
            Err(e) => {
                if let Some(s) = &staged_shim {
                    let _ = fs::remove_file(s);
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    if let (Some(old), Some(_)) = (&old_text, &staged_config) {
        let backup = backup_path(&req.config);
        if let Err(e) = fs::write(&backup, old) {
            for s in staged_shim.iter().chain(&staged_config) {
                let _ = fs::remove_file(s);
            }
            return Err(anyhow!(e)
                .context(format!("Cannot write {}", backup.display()))
                .into());
        }
    }
    if let Some(staged) = &staged_shim {
        put_in_place(staged, &target)?;
    }
    if let Some(staged) = &staged_config {
        put_in_place(staged, &req.config)?;
    }
    report(req, &target, shim_changed, config_changed, verb);
    if shim_changed || config_changed {
        println!("Restart containerd to load the runtime: systemctl restart containerd");
    }
    Ok(())
}

fn report(req: &Install, target: &Path, shim_changed: bool, config_changed: bool, verb: &str) {
    if shim_changed {
        println!("{verb} {}", target.display());
    } else {
        println!("{} is up to date", target.display());
    }
    if config_changed {
        let verb = if req.dry_run {
            "Would register"
        } else {
            "Registered"
        };
        println!(
            "{verb} runtime {HANDLER} ({RUNTIME_TYPE}) in {}",
            req.config.display()
        );
        if !req.dry_run && backup_path(&req.config).exists() {
            println!(
                "The previous config is in {}",
                backup_path(&req.config).display()
            );
        }
    } else {
        println!(
            "{} already registers runtime {HANDLER}",
            req.config.display()
        );
    }
}

/// `containerd-shim-vmfactory-v2` next to the running binary.
fn default_shim() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("Cannot find the vmfactory binary")?;
    let shim = exe
        .parent()
        .map(|d| d.join(SHIM_BINARY))
        .context("The vmfactory binary has no directory")?;
    if !shim.is_file() {
        bail!("No shim binary at {} (pass --shim PATH)", shim.display());
    }
    Ok(shim)
}

fn backup_path(config: &Path) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(".vmfactory-backup");
    PathBuf::from(name)
}

/// Writes `data` to a temporary file beside `target` (same filesystem, so the rename is
/// atomic), synced, with `mode`.
fn stage(target: &Path, data: &[u8], mode: u32) -> Result<PathBuf, Failure> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let staged = dir.join(format!(".{name}.vmfactory-install-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged)?;
        file.write_all(data)?;
        // The mode again: `open` applied the umask.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    };
    write().map_err(|e| {
        if staged.exists() {
            let _ = fs::remove_file(&staged);
        }
        Failure::from(anyhow!(e).context(format!("Cannot write in {}", dir.display())))
    })?;
    Ok(staged)
}

fn put_in_place(staged: &Path, target: &Path) -> CmdResult {
    fs::rename(staged, target).map_err(|e| {
        let _ = fs::remove_file(staged);
        Failure::from(anyhow!(e).context(format!("Cannot replace {}", target.display())))
    })
}

/// `text` (a containerd config) with the vmfactory runtime registered; unchanged if it is
/// there already. An empty text becomes a version 2 config.
fn register(text: &str) -> anyhow::Result<String> {
    let mut doc: DocumentMut = text.parse().context("Not valid TOML")?;
    match doc.get("version").map(|v| v.as_integer()) {
        None if doc.is_empty() => {
            doc.insert("version", toml_edit::value(2));
        }
        Some(Some(2)) => {}
        _ => bail!("Only `version = 2` configs (containerd 1.5 to 1.7) are supported"),
    }
    let mut table = doc.as_table_mut();
    for (depth, key) in RUNTIMES_PATH.iter().chain(&[HANDLER]).enumerate() {
        let entry = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            // Headers only where the entry itself is written (`[plugins...runtimes.vmfactory]`).
            t.set_implicit(depth < RUNTIMES_PATH.len());
            // New tables go after everything there, not amid the existing ones.
            t.set_position(Some(isize::MAX));
            Item::Table(t)
        });
        table = entry
            .as_table_mut()
            .with_context(|| format!("`{key}` is not a table"))?;
    }
    match table.get("runtime_type").map(|v| v.as_str()) {
        None => {
            table.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
        }
        Some(Some(RUNTIME_TYPE)) => {}
        Some(other) => bail!(
            "Runtime {HANDLER} already has runtime_type {}, not {RUNTIME_TYPE}",
            other.unwrap_or("(not a string)")
        ),
    }
    Ok(doc.to_string())
}

/// Whether the config's `disabled_plugins` turns the CRI plugin off.
fn cri_disabled(text: &str) -> bool {
    let Ok(doc) = text.parse::<DocumentMut>() else {
        return false;
    };
    doc.get("disabled_plugins")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|p| matches!(p.as_str(), Some("cri" | "io.containerd.grpc.v1.cri")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = r#"version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

    fn runtime_type(text: &str) -> Option<String> {
        let doc: toml::Table = toml::from_str(text).expect("TOML");
        let mut v = &toml::Value::Table(doc);
        for key in RUNTIMES_PATH.iter().chain(&[HANDLER]) {
            v = v.get(key)?;
        }
        v.get("runtime_type")?.as_str().map(String::from)
    }

    #[test]
    fn empty_config_becomes_version_2_with_the_runtime() {
        let text = register("").expect("register");
        assert_eq!(runtime_type(&text).as_deref(), Some(RUNTIME_TYPE));
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(
            text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmfactory]"),
            "{text}"
        );
        assert_eq!(register(&text).expect("again"), text, "idempotent");
    }

    #[test]
    fn existing_config_keeps_its_text_and_comments() {
        let with_comment = format!("# kept\n{DEBIAN}");
        let text = register(&with_comment).expect("register");
        assert!(text.starts_with(&with_comment), "{text}");
        assert_eq!(runtime_type(&text).as_deref(), Some(RUNTIME_TYPE));
        assert_eq!(register(&text).expect("again"), text);
    }

    #[test]
    fn refused_configs() {
        for (text, why) in [
            ("version = 1\n", "version 1"),
            ("root = \"/x\"\n", "no version: a version 1 config"),
            ("version = 2\nplugins = 3\n", "plugins not a table"),
            ("version = [\n", "not TOML"),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmfactory]\nruntime_type = \"io.containerd.runc.v2\"\n",
                "another runtime type under our handler",
            ),
        ] {
            assert!(register(text).is_err(), "{why}");
        }
    }

    #[test]
    fn disabled_cri_is_noticed() {
        assert!(cri_disabled("disabled_plugins = [\"cri\"]\n"));
        assert!(cri_disabled(
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        ));
        assert!(!cri_disabled(DEBIAN));
    }
}
