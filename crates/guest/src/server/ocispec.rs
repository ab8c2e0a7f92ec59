//! A container's OCI spec checked and turned into what its init does ([`InitPlan`]): every
//! refusal happens here, before anything is mounted, so a bad spec leaves nothing behind.

use std::ffi::{c_int, c_ulong, CString};
use std::path::{Component, Path};

use nix::sched::CloneFlags;

use vmfactory_agent::{ContainerSpec, ProcessSpec};

use super::nsexec::{ExecPlan, InitPlan, MountPlan};
use super::process::DEFAULT_PATH;
use crate::error::{Error, Result};

/// Devices a container's own `/dev` gets, bound from the guest's.
const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Links in a container's own `/dev`: (target, name).
const DEFAULT_LINKS: [(&str, &str); 5] = [
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// A container id: used in paths and cgroup names.
pub(super) fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "container id {id:?}: 1-128 of [A-Za-z0-9._-]"
        )))
    }
}

/// An absolute path without `..`: a destination in the container.
fn check_abs(p: &str, what: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(format!(
            "{what} {p:?} is not an absolute path without .."
        )));
    }
    Ok(())
}

/// The clone flags of the namespaces the spec asks for; pid, mount, uts and ipc are always
/// made (the container's isolation), network and cgroup are shared with the VM.
pub(super) fn namespaces(spec: &ContainerSpec) -> Result<CloneFlags> {
    for ns in &spec.namespaces {
        if !ns.path.is_empty() {
            return Err(invalid(format!(
                "joining the {} namespace at {:?} is not supported",
                ns.kind, ns.path
            )));
        }
        match ns.kind.as_str() {
            "pid" | "mount" | "uts" | "ipc" | "network" | "cgroup" => {}
            "user" => return Err(invalid("user namespaces are not supported")),
            other => return Err(invalid(format!("unknown namespace {other:?}"))),
        }
    }
    Ok(CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC)
}

/// `<root>/a`, `<root>/a/b`, … down to `dest` (or its parent, for a file).
fn mkdirs(root: &str, dest: &str, file: bool) -> Result<Vec<CString>> {
    let parts: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
    let n = if file {
        parts.len().saturating_sub(1)
    } else {
        parts.len()
    };
    (1..=n)
        .map(|i| {
            cstring(
                &format!("{root}/{}", parts[..i].join("/")),
                "mount destination",
            )
        })
        .collect()
}

/// The resource number of an OCI rlimit name.
fn rlimit_resource(name: &str) -> Option<c_int> {
    let r = match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    };
    c_int::try_from(r).ok()
}

/// What a process in a container execs: the program looked up in the `PATH` of its
/// environment (inside the container, by the child: each candidate is tried).
pub(super) fn exec_plan(p: &ProcessSpec) -> Result<ExecPlan> {
    let program = p
        .args
        .first()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("no program to run (process.args is empty)"))?;
    let mut path = None;
    for kv in &p.env {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| invalid(format!("environment entry {kv:?} is not KEY=VALUE")))?;
        if k == "PATH" {
            path = Some(v.to_owned());
        }
    }
    let mut env = p.env.clone();
    if path.is_none() {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    let programs = if program.contains('/') {
        vec![program.clone()]
    } else {
        path.as_deref()
            .unwrap_or(DEFAULT_PATH)
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
            .collect()
    };
    let cwd = if p.cwd.is_empty() { "/" } else { &p.cwd };
    check_abs(cwd, "process.cwd")?;
    Ok(ExecPlan {
        programs: programs
            .iter()
            .map(|s| cstring(s, "program"))
            .collect::<Result<_>>()?,
        argv: p
            .args
            .iter()
            .map(|s| cstring(s, "argument"))
            .collect::<Result<_>>()?,
        envp: env
            .iter()
            .map(|s| cstring(s, "environment entry"))
            .collect::<Result<_>>()?,
        cwd: cstring(cwd, "process.cwd")?,
        uid: p.uid,
        gid: p.gid,
        groups: p.additional_gids.clone(),
        no_new_privs: false,
        terminal: p.terminal,
        rlimits: Vec::new(),
    })
}

/// Splits OCI mount options into mount flags, a remount for bind mounts, propagation and
/// file-system data.
fn mount_flags(options: &[String]) -> (c_ulong, c_ulong, Option<c_ulong>, Vec<String>) {
    let (mut flags, mut clear) = (0, 0);
    let mut propagation = None;
    let mut data = Vec::new();
    for o in options {
        let (set, unset) = match o.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "noatime" => (libc::MS_NOATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => {
                let base = match o.trim_start_matches('r') {
                    "private" => libc::MS_PRIVATE,
                    "shared" => libc::MS_SHARED,
                    _ => libc::MS_SLAVE,
                };
                let rec = if o.starts_with('r') { libc::MS_REC } else { 0 };
                propagation = Some(base | rec);
                continue;
            }
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        flags |= set;
        clear |= unset;
    }
    (flags & !clear, clear, propagation, data)
}

/// Checks `spec` and makes the plan of its init, whose root is `rootfs` (a guest path).
/// Answers the plan and, per mount, whether its target is a file (a bind mount of a file).
pub(super) fn init_plan(spec: &ContainerSpec, rootfs: &Path) -> Result<(InitPlan, Vec<bool>)> {
    if !spec.root_path.is_empty() && !Path::new(&spec.root_path).is_absolute() {
        return Err(invalid(format!(
            "root.path {:?} is relative (the agent mounts the root; give it absolute or empty)",
            spec.root_path
        )));
    }
    namespaces(spec)?;
    let mut exec = exec_plan(&spec.process)?;
    exec.no_new_privs = spec.no_new_privileges;
    for r in &spec.rlimits {
        let res = rlimit_resource(&r.kind)
            .ok_or_else(|| invalid(format!("unknown rlimit {:?}", r.kind)))?;
        if r.soft > r.hard {
            return Err(invalid(format!("rlimit {}: soft above hard", r.kind)));
        }
        exec.rlimits.push((
            res,
            libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            },
        ));
    }
    let root_str = rootfs
        .to_str()
        .ok_or_else(|| invalid("the container's directory is not UTF-8"))?;
    let mut mounts = Vec::new();
    let mut file_targets = Vec::new();
    for m in &spec.mounts {
        check_abs(&m.destination, "mount destination")?;
        // The terminals the agent opens for this container's processes are the guest's
        // (`openpty` in the agent): a new devpts instance would not hold them, and `tty`,
        // `ttyname` and job control would fail. So /dev/pts is the guest's, bound.
        let guest_pts;
        let m = if m.kind == "devpts" && m.destination.trim_end_matches('/') == "/dev/pts" {
            guest_pts = vmfactory_agent::Mount {
                destination: m.destination.clone(),
                source: "/dev/pts".into(),
                kind: "bind".into(),
                options: vec!["rbind".into(), "nosuid".into(), "noexec".into()],
            };
            &guest_pts
        } else {
            m
        };
        let (flags, clear, propagation, data) = mount_flags(&m.options);
        let bind = m.kind == "bind" || flags & libc::MS_BIND != 0;
        let target = format!("{root_str}{}", m.destination.trim_end_matches('/'));
        let mut is_file = false;
        let (flags, remount, data) = if bind {
            check_abs(&m.source, "bind mount source")?;
            let meta = std::fs::metadata(&m.source)
                .map_err(|e| invalid(format!("bind mount source {:?}: {e}", m.source)))?;
            is_file = !meta.is_dir();
            // A bind mount takes its flags only on a remount.
            let extra = flags & !(libc::MS_BIND | libc::MS_REC);
            let remount = (extra != 0).then_some(libc::MS_BIND | libc::MS_REMOUNT | extra);
            (libc::MS_BIND | (flags & libc::MS_REC), remount, None)
        } else {
            if m.kind.is_empty() {
                return Err(invalid(format!("mount {:?} has no type", m.destination)));
            }
            let data = (!data.is_empty()).then(|| data.join(","));
            (flags, None, data)
        };
        let _ = clear;
        mounts.push(MountPlan {
            mkdirs: mkdirs(root_str, &m.destination, is_file)?,
            create_file: is_file,
            source: Some(cstring(
                if m.source.is_empty() {
                    &m.kind
                } else {
                    &m.source
                },
                "mount source",
            )?),
            target: cstring(&target, "mount destination")?,
            fstype: (!bind)
                .then(|| cstring(&m.kind, "mount type"))
                .transpose()?,
            flags,
            data: data.map(|d| cstring(&d, "mount options")).transpose()?,
            remount,
            propagation,
        });
        file_targets.push(is_file);
    }
    // A fresh /dev gets the usual devices (bound from the guest's) and links, as runc makes.
    let mut symlinks = Vec::new();
    if spec
        .mounts
        .iter()
        .any(|m| m.destination.trim_end_matches('/') == "/dev")
    {
        for dev in DEFAULT_DEVICES {
            mounts.push(MountPlan {
                source: Some(cstring(&format!("/dev/{dev}"), "device")?),
                target: cstring(&format!("{root_str}/dev/{dev}"), "device")?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
                remount: None,
                propagation: None,
                mkdirs: mkdirs(root_str, "/dev/null", true)?,
                create_file: true,
            });
        }
        for (target, link) in DEFAULT_LINKS {
            symlinks.push((
                cstring(target, "link")?,
                cstring(&format!("{root_str}/dev/{link}"), "link")?,
            ));
        }
    }
    let mut sysctl = Vec::new();
    for (k, v) in &spec.sysctl {
        if k.is_empty() || k.contains('/') || k.split('.').any(|c| c.is_empty() || c == "..") {
            return Err(invalid(format!("sysctl {k:?}")));
        }
        sysctl.push((
            cstring(
                &format!("{root_str}/proc/sys/{}", k.replace('.', "/")),
                "sysctl",
            )?,
            cstring(v, "sysctl value")?,
        ));
    }
    let paths = |list: &[String], what: &str| -> Result<Vec<CString>> {
        list.iter()
            .map(|p| {
                check_abs(p, what)?;
                cstring(&format!("{root_str}{p}"), what)
            })
            .collect()
    };
    let hostname = if spec.hostname.is_empty() {
        None
    } else if spec.hostname.len() > 64 {
        return Err(invalid(format!(
            "hostname {:?} is over 64 bytes",
            spec.hostname
        )));
    } else {
        Some(cstring(&spec.hostname, "hostname")?)
    };
    Ok((
        InitPlan {
            rootfs: cstring(root_str, "root")?,
            mounts,
            hostname,
            sysctl,
            masked: paths(&spec.masked_paths, "masked path")?,
            readonly: paths(&spec.readonly_paths, "read-only path")?,
            symlinks,
            root_readonly: spec.root_readonly,
            exec,
        },
        file_targets,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_agent::{Mount, Namespace, Rlimit};

    fn good() -> ContainerSpec {
        ContainerSpec {
            process: ProcessSpec::new(["sh", "-c", "true"]),
            root_path: "/rootfs".into(),
            hostname: "box".into(),
            mounts: vec![
                Mount {
                    destination: "/proc".into(),
                    source: "proc".into(),
                    kind: "proc".into(),
                    options: vec!["nosuid".into(), "noexec".into()],
                },
                Mount {
                    destination: "/dev".into(),
                    source: "tmpfs".into(),
                    kind: "tmpfs".into(),
                    options: vec!["nosuid".into(), "mode=755".into()],
                },
                Mount {
                    destination: "/etc/hostname".into(),
                    source: "/proc/self/exe".into(),
                    kind: "bind".into(),
                    options: vec!["rbind".into(), "ro".into(), "rprivate".into()],
                },
            ],
            namespaces: ["pid", "mount", "ipc", "uts", "network"]
                .iter()
                .map(|k| Namespace {
                    kind: (*k).into(),
                    path: String::new(),
                })
                .collect(),
            rlimits: vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                hard: 1024,
                soft: 1024,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_spec_becomes_a_plan() {
        let (plan, files) = init_plan(&good(), Path::new("/run/c/rootfs")).expect("plan");
        assert_eq!(
            plan.mounts.len(),
            3 + DEFAULT_DEVICES.len(),
            "/dev gets devices"
        );
        assert!(plan.mounts[3].create_file);
        let dirs: Vec<&str> = plan.mounts[2]
            .mkdirs
            .iter()
            .map(|d| d.to_str().unwrap_or_default())
            .collect();
        assert_eq!(dirs, ["/run/c/rootfs/etc"], "a file's parent only");
        assert!(plan.mounts[2].create_file);
        assert_eq!(plan.symlinks.len(), DEFAULT_LINKS.len());
        assert_eq!(plan.mounts[0].target.to_str(), Ok("/run/c/rootfs/proc"));
        assert_eq!(plan.mounts[0].flags, libc::MS_NOSUID | libc::MS_NOEXEC);
        assert_eq!(
            plan.mounts[1].data.as_deref().map(|d| d.to_str()),
            Some(Ok("mode=755"))
        );
        let bind = &plan.mounts[2];
        assert_eq!(bind.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(
            bind.remount,
            Some(libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY)
        );
        assert_eq!(bind.propagation, Some(libc::MS_PRIVATE | libc::MS_REC));
        assert!(bind.fstype.is_none());
        assert_eq!(files, [false, false, true]);
        assert_eq!(
            plan.hostname.as_deref().map(|h| h.to_str()),
            Some(Ok("box"))
        );
        assert!(plan
            .exec
            .programs
            .iter()
            .any(|p| p.to_str() == Ok("/bin/sh")));
        assert!(plan
            .exec
            .envp
            .iter()
            .any(|e| e.to_str().is_ok_and(|e| e.starts_with("PATH="))));
        assert_eq!(plan.exec.rlimits.len(), 1);
    }

    #[test]
    fn bad_specs_are_refused_with_one_line() {
        let root = Path::new("/run/c/rootfs");
        type Edit = Box<dyn Fn(&mut ContainerSpec)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("no program", Box::new(|s| s.process.args.clear())),
            ("relative", Box::new(|s| s.root_path = "rootfs".into())),
            (
                "unknown namespace",
                Box::new(|s| s.namespaces[0].kind = "time-travel".into()),
            ),
            (
                "user namespaces",
                Box::new(|s| s.namespaces[0].kind = "user".into()),
            ),
            (
                "joining",
                Box::new(|s| s.namespaces[0].path = "/proc/1/ns/pid".into()),
            ),
            (
                "absolute path",
                Box::new(|s| s.mounts[0].destination = "proc".into()),
            ),
            (
                "absolute path",
                Box::new(|s| s.mounts[0].destination = "/a/../../etc".into()),
            ),
            (
                "bind mount source",
                Box::new(|s| s.mounts[2].source = "/no/such/file".into()),
            ),
            (
                "unknown rlimit",
                Box::new(|s| s.rlimits[0].kind = "RLIMIT_FUN".into()),
            ),
            (
                "KEY=VALUE",
                Box::new(|s| s.process.env = vec!["NOEQUALS".into()]),
            ),
            ("64 bytes", Box::new(|s| s.hostname = "h".repeat(65))),
            (
                "sysctl",
                Box::new(|s| {
                    s.sysctl.insert("../x".into(), "1".into());
                }),
            ),
            ("NUL", Box::new(|s| s.process.args[0] = "s\0h".into())),
        ];
        for (want, edit) in cases {
            let mut s = good();
            edit(&mut s);
            let e = init_plan(&s, root).expect_err(want);
            assert!(matches!(e, Error::Invalid(_)), "{want}: {e:?}");
            let text = e.to_string();
            assert!(text.contains(want), "{want}: {text}");
            assert!(!text.contains('\n'), "{text}");
        }
        for bad in ["", "a/b", "..", "x y"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        check_id("ctr-1_a.b").expect("good id");
    }
}
