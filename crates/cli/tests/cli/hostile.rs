//! Hostile files where vmfactory reads: a FIFO, a symlink, a device or an oversized file as
//! template metadata or configuration is refused at once with one line naming it, and nothing
//! is created. Uses the helpers of `cli.rs` and the stored inputs of `inspect.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::inspect::Stored;
use super::{assert_one_line_error, Scratch, BIN};

/// Longer than any refusal takes (milliseconds); a hang (a FIFO opened without `O_NONBLOCK`,
/// `/dev/zero` read whole) is killed at this bound and fails the test.
const BOUND: Duration = Duration::from_secs(10);

/// `vmfactory --config <config> <args>` with no input, killed and failed after [`BOUND`].
fn run_bounded(config: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        // The scratch configs' fake QEMU sits beside them.
        .env(
            "PATH",
            super::with_path(config.parent().unwrap_or(Path::new("/"))),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmfactory");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmfactory {args:?} still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// Every path under `dir` with its file type (no content: a FIFO must not be read).
fn listing(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut all = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            let ty = std::fs::symlink_metadata(&path).expect("lstat").file_type();
            if ty.is_dir() {
                todo.push(path.clone());
            }
            all.insert(path, format!("{ty:?}"));
        }
    }
    all
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
}

#[test]
fn fifo_metadata_fails_fast_in_every_command_and_leaves_nothing() {
    // Exit codes as for any bad stored input: 2 where the template is read (`status`,
    // `inspect`, `get`), 1 for `init`, which refuses an occupied template path.
    for (args, code) in [
        (&["status"][..], 2),
        (&["inspect", "template"][..], 2),
        (&["get"][..], 2),
        (&["init"][..], 1),
    ] {
        let s = Scratch::new();
        let cfg = s.write(&s.config(true, 0));
        std::fs::create_dir(s.path().join("tpl")).expect("mkdir");
        let fifo = s.path().join("tpl/metadata.json");
        mkfifo(&fifo);
        let before = listing(s.path());
        let started = Instant::now();
        let o = run_bounded(&cfg, args);
        let fifo = fifo.display().to_string();
        assert_one_line_error(&o, code, &[&fifo, "not a regular file", "Is a FIFO"]);
        eprintln!("{args:?}: refused in {:?}", started.elapsed());
        assert_eq!(listing(s.path()), before, "{args:?} left something behind");
    }
}

#[test]
fn symlinked_metadata_is_refused_not_parsed() {
    for args in [&["status"][..], &["inspect", "template"][..], &["get"][..]] {
        let st = Stored::new();
        // Valid metadata moved elsewhere and linked: following the link would accept it.
        let elsewhere = st.scratch.path().join("elsewhere.json");
        std::fs::rename(st.metadata_file(), &elsewhere).expect("move");
        std::os::unix::fs::symlink(&elsewhere, st.metadata_file()).expect("symlink");
        let before = listing(st.scratch.path());
        let o = st.run(args);
        let link = st.metadata_file().display().to_string();
        assert_one_line_error(&o, 2, &[&link, "symbolic link (not followed)"]);
        assert!(o.stdout.is_empty() || args == ["status"], "nothing printed");
        assert_eq!(listing(st.scratch.path()), before, "{args:?}");
    }
    // A link to a file that is no metadata at all is refused the same way, not parsed.
    let st = Stored::new();
    std::fs::remove_file(st.metadata_file()).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", st.metadata_file()).expect("symlink");
    let o = st.run(&["inspect", "template"]);
    assert_one_line_error(&o, 2, &["symbolic link"]);
    assert!(!super::stderr(&o).contains("corrupt"), "not parsed");
}

#[test]
fn config_that_is_a_device_fifo_link_or_too_large_fails_at_once() {
    let s = Scratch::new();
    let good = s.write(&s.config(true, 0));
    let fifo = s.path().join("fifo.toml");
    mkfifo(&fifo);
    let link = s.path().join("link.toml");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    // Valid TOML (a comment) one byte over the 1 MiB limit.
    let big = s.path().join("big.toml");
    let mut text = std::fs::read_to_string(&good).expect("config");
    text.push('#');
    text.push_str(&" ".repeat((1 << 20) + 1 - text.len()));
    std::fs::write(&big, text).expect("write");
    let cases: [(&Path, &[&str]); 4] = [
        (
            Path::new("/dev/zero"),
            &["/dev/zero", "Is a character device"],
        ),
        (&fifo, &["fifo.toml", "Is a FIFO"]),
        (&link, &["link.toml", "symbolic link"]),
        (&big, &["big.toml", "too large", "limit 1048576"]),
    ];
    for (config, needles) in cases {
        let started = Instant::now();
        eprintln!("config check --config {}", config.display());
        let o = run_bounded(config, &["config", "check"]);
        let took = started.elapsed();
        assert_one_line_error(&o, 2, needles);
        assert!(super::stderr(&o).contains("Cannot read config"));
        assert!(took < Duration::from_secs(5), "{config:?} took {took:?}");
    }
    let o = run_bounded(&good, &["config", "check"]);
    assert_eq!(o.status.code(), Some(0), "{}", super::stderr(&o));
}
