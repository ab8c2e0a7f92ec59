//! The code between clone(2) and execve(2) of a container's processes.
//!
//! The agent is multithreaded, so a cloned child may only make system calls: another thread
//! may have held the allocator's lock at the clone. Everything the child needs (paths, argv,
//! envp, mount arguments) is therefore made here, in the parent, as C strings and plain
//! numbers, and the child reports a failure as a fixed-size record on a pipe: which step,
//! which errno. Success is the pipe's end (it is close-on-exec).
//!
//! A container's init is cloned into new mount, PID, UTS and IPC namespaces, sets up its root
//! and parks on a pipe until `StartContainer`. A process exec'd into a running container is
//! a child that joins the init's namespaces, then clones with `CLONE_PARENT` (so that the
//! agent is its parent and reaps it) into the init's PID namespace, and exits.

use std::ffi::{c_char, c_int, c_ulong, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sched::CloneFlags;
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// A step of the child, as reported with its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum Step {
    JoinCgroup = 1,
    MakePrivate,
    Mount,
    SetHostname,
    ChangeRoot,
    Sysctl,
    MaskPath,
    ReadonlyPath,
    ReadonlyRoot,
    Rlimit,
    Session,
    Stdio,
    SetIds,
    NoNewPrivs,
    Cwd,
    Exec,
    JoinNamespace,
    Clone,
}

impl Step {
    /// Every step, in wire order (the discriminants run 1, 2, … in this order).
    const ALL: [Step; 18] = [
        Step::JoinCgroup,
        Step::MakePrivate,
        Step::Mount,
        Step::SetHostname,
        Step::ChangeRoot,
        Step::Sysctl,
        Step::MaskPath,
        Step::ReadonlyPath,
        Step::ReadonlyRoot,
        Step::Rlimit,
        Step::Session,
        Step::Stdio,
        Step::SetIds,
        Step::NoNewPrivs,
        Step::Cwd,
        Step::Exec,
        Step::JoinNamespace,
        Step::Clone,
    ];

    fn from_wire(n: u32) -> Option<Step> {
        Self::ALL.into_iter().find(|s| *s as u32 == n)
    }

    fn what(self) -> &'static str {
        match self {
            Step::JoinCgroup => "join the container's cgroup",
            Step::MakePrivate => "make the mounts private",
            Step::Mount => "mount",
            Step::SetHostname => "set the host name",
            Step::ChangeRoot => "change into the container's root",
            Step::Sysctl => "set sysctl",
            Step::MaskPath => "mask path",
            Step::ReadonlyPath => "make read-only path",
            Step::ReadonlyRoot => "make the root read-only",
            Step::Rlimit => "set rlimit",
            Step::Session => "start a session on the terminal",
            Step::Stdio => "set up the standard streams",
            Step::SetIds => "set user and groups",
            Step::NoNewPrivs => "set no_new_privs",
            Step::Cwd => "change to the working directory",
            Step::Exec => "execute",
            Step::JoinNamespace => "join the container's namespace",
            Step::Clone => "clone into the container",
        }
    }
}

/// What the child reports on its status pipe.
const READY: u32 = 1;
const FAILED: u32 = 2;
const PID: u32 = 3;
const RECORD: usize = 16;

/// One mount the init makes, its paths already under the container's root.
#[derive(Debug)]
pub(super) struct MountPlan {
    pub(super) source: Option<CString>,
    pub(super) target: CString,
    pub(super) fstype: Option<CString>,
    pub(super) flags: c_ulong,
    pub(super) data: Option<CString>,
    /// A second call for what a bind mount cannot take at once (`ro`, `nosuid`, …).
    pub(super) remount: Option<c_ulong>,
    /// `MS_PRIVATE`, `MS_SLAVE`, … (with `MS_REC`), as a third call.
    pub(super) propagation: Option<c_ulong>,
    /// Directories made first (ancestors, and the target unless it is a file): an earlier
    /// mount (a tmpfs on `/dev`) may hide what the parent made in the image.
    pub(super) mkdirs: Vec<CString>,
    /// Create the target as an empty file first (a file bind mount, a device in `/dev`).
    pub(super) create_file: bool,
}

/// The process a child execs, and what it becomes first.
#[derive(Debug)]
pub(super) struct ExecPlan {
    /// Paths to try in turn (the program looked up in `PATH`).
    pub(super) programs: Vec<CString>,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) cwd: CString,
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
    pub(super) groups: Vec<libc::gid_t>,
    pub(super) no_new_privs: bool,
    pub(super) terminal: bool,
    pub(super) rlimits: Vec<(c_int, libc::rlimit)>,
}

/// A container's init: its root and mounts, then [`ExecPlan`].
#[derive(Debug)]
pub(super) struct InitPlan {
    pub(super) rootfs: CString,
    pub(super) mounts: Vec<MountPlan>,
    pub(super) hostname: Option<CString>,
    /// `<rootfs>/proc/sys/...` paths and values; like the masked and read-only paths, set
    /// before the root changes, when the guest's `/dev/null` is still at hand.
    pub(super) sysctl: Vec<(CString, CString)>,
    pub(super) masked: Vec<CString>,
    pub(super) readonly: Vec<CString>,
    /// (target, link path) of symlinks made after the mounts (`/dev/fd`, …).
    pub(super) symlinks: Vec<(CString, CString)>,
    pub(super) root_readonly: bool,
    pub(super) exec: ExecPlan,
}

/// The namespaces and root of a running container, for an exec into it.
#[derive(Debug)]
pub(super) struct JoinPlan {
    /// ipc, uts, pid, mnt: joined in this order (the mount namespace last: after it the
    /// agent's paths are gone).
    pub(super) namespaces: Vec<OwnedFd>,
    /// The init's root directory (`/proc/<pid>/root`).
    pub(super) root: OwnedFd,
    pub(super) exec: ExecPlan,
}

/// The child's ends of its standard streams.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChildStdio {
    pub(super) fds: [RawFd; 3],
}

/// Pointer arrays for execve, made in the parent.
struct Ptrs {
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
}

impl ExecPlan {
    fn ptrs(&self) -> Ptrs {
        let list = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Ptrs {
            argv: list(&self.argv),
            envp: list(&self.envp),
        }
    }
}

/// A failure in the child: step, errno, and an index (which mount, which rlimit).
type ChildResult = std::result::Result<(), (Step, c_int, c_int)>;

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(ret: c_int, step: Step, arg: usize) -> ChildResult {
    if ret < 0 {
        Err((step, errno(), c_int::try_from(arg).unwrap_or(-1)))
    } else {
        Ok(())
    }
}

fn report(fd: RawFd, kind: u32, a: u32, b: c_int, c: c_int) {
    let mut rec = [0u8; RECORD];
    rec[..4].copy_from_slice(&kind.to_ne_bytes());
    rec[4..8].copy_from_slice(&a.to_ne_bytes());
    rec[8..12].copy_from_slice(&b.to_ne_bytes());
    rec[12..].copy_from_slice(&c.to_ne_bytes());
    // SAFETY: writes RECORD bytes from a live array; a short or failed write is as if the
    // child died, which the parent reads as the pipe's end.
    unsafe { libc::write(fd, rec.as_ptr().cast(), RECORD) };
}

fn ptr(c: &Option<CString>) -> *const c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// mount(2) with optional arguments.
fn sys_mount(
    src: *const c_char,
    target: *const c_char,
    fstype: *const c_char,
    flags: c_ulong,
    data: *const c_char,
) -> c_int {
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    unsafe { libc::mount(src, target, fstype, flags, data.cast()) }
}

/// Moves the status and start fds out of the way, puts the stdio ends on 0-2, the status on
/// 3 (close-on-exec) and the start pipe on 4, and closes everything else: a parked init must
/// not hold other processes' pipes open.
fn arrange_fds(stdio: ChildStdio, status: RawFd, start: Option<RawFd>) -> ChildResult {
    // SAFETY: a system call on integers and live, NUL-terminated data.
    let status_hi = unsafe { libc::fcntl(status, libc::F_DUPFD_CLOEXEC, 10) };
    check(status_hi, Step::Stdio, 0)?;
    let start_hi = match start {
        Some(fd) => {
            // SAFETY: a system call on integers and live, NUL-terminated data.
            let hi = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            check(hi, Step::Stdio, 1)?;
            Some(hi)
        }
        None => None,
    };
    for (i, fd) in stdio.fds.iter().enumerate() {
        let target = c_int::try_from(i).unwrap_or(0);
        // SAFETY: a system call on integers and live, NUL-terminated data.
        check(unsafe { libc::dup2(*fd, target) }, Step::Stdio, i)?;
    }
    check(
        // SAFETY: a system call on integers and live, NUL-terminated data.
        unsafe { libc::dup3(status_hi, 3, libc::O_CLOEXEC) },
        Step::Stdio,
        3,
    )?;
    let mut keep_to = 3;
    if let Some(hi) = start_hi {
        check(
            // SAFETY: a system call on integers and live, NUL-terminated data.
            unsafe { libc::dup3(hi, 4, libc::O_CLOEXEC) },
            Step::Stdio,
            4,
        )?;
        keep_to = 4;
    }
    // SAFETY: a system call on integers and live, NUL-terminated data.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, keep_to + 1, c_int::MAX, 0) };
    check(if ret < 0 { -1 } else { 0 }, Step::Stdio, 5)
}

/// What every container process does last: limits, session, identity, cwd, exec.
/// `status` is fd 3 by now. Returns only on failure.
fn become_process(plan: &ExecPlan, ptrs: &Ptrs) -> (Step, c_int, c_int) {
    let run = || -> ChildResult {
        // The agent ignores SIGPIPE (Rust's runtime does) and an ignored signal stays ignored
        // across exec: the container's processes get the defaults and an empty mask.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // SAFETY: resets one disposition; no handler pointer is involved.
                unsafe { libc::signal(sig, libc::SIG_DFL) };
            }
        }
        // SAFETY: a zeroed sigset is a valid empty set, read by the call.
        let empty: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: sets the mask from a live, empty set.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
        for (i, (res, lim)) in plan.rlimits.iter().enumerate() {
            // SAFETY: the rlimit is a live value; the resource was checked by the parent.
            check(unsafe { libc::setrlimit(*res as _, lim) }, Step::Rlimit, i)?;
        }
        // SAFETY: setsid and TIOCSCTTY on fd 0 (the terminal's slave) take no pointers.
        check(unsafe { libc::setsid() }, Step::Session, 0)?;
        if plan.terminal {
            check(
                // SAFETY: a system call on integers and live, NUL-terminated data.
                unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) },
                Step::Session,
                1,
            )?;
        }
        // Raw system calls: glibc's wrappers would signal every thread the parent had and
        // wait for them (setxid broadcast), and this child has none of them: it would spin.
        let sys = |r: libc::c_long| if r < 0 { -1 } else { 0 };
        // SAFETY: setgroups reads `groups.len()` gids from a live slice.
        let r =
            unsafe { libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()) };
        check(sys(r), Step::SetIds, 0)?;
        // SAFETY: an integer argument only.
        let r = unsafe { libc::syscall(libc::SYS_setgid, plan.gid) };
        check(sys(r), Step::SetIds, 1)?;
        // SAFETY: an integer argument only.
        let r = unsafe { libc::syscall(libc::SYS_setuid, plan.uid) };
        check(sys(r), Step::SetIds, 2)?;
        if plan.no_new_privs {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            check(r, Step::NoNewPrivs, 0)?;
        }
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::chdir(plan.cwd.as_ptr()) }, Step::Cwd, 0)?;
        Ok(())
    };
    if let Err(e) = run() {
        return e;
    }
    let mut err = libc::ENOENT;
    for p in &plan.programs {
        // SAFETY: the path and both arrays are NUL-terminated and live; execve only returns
        // on failure.
        unsafe { libc::execve(p.as_ptr(), ptrs.argv.as_ptr(), ptrs.envp.as_ptr()) };
        let e = errno();
        if e != libc::ENOENT && e != libc::ENOTDIR {
            err = e;
        }
    }
    (Step::Exec, err, 0)
}

fn fail(status: RawFd, (step, e, arg): (Step, c_int, c_int)) -> ! {
    report(status, FAILED, step as u32, e, arg);
    // SAFETY: _exit ends the child without running the parent's atexit handlers or
    // destructors.
    unsafe { libc::_exit(127) }
}

fn init_setup(plan: &InitPlan, cgroup_procs: RawFd) -> ChildResult {
    // SAFETY: writes one byte from a static string ("0": the writing process).
    let n = unsafe { libc::write(cgroup_procs, b"0".as_ptr().cast(), 1) };
    check(if n == 1 { 0 } else { -1 }, Step::JoinCgroup, 0)?;
    let root = c"/".as_ptr();
    let none = std::ptr::null();
    check(
        sys_mount(none, root, none, libc::MS_REC | libc::MS_PRIVATE, none),
        Step::MakePrivate,
        0,
    )?;
    for (i, m) in plan.mounts.iter().enumerate() {
        let t = m.target.as_ptr();
        for d in &m.mkdirs {
            // SAFETY: NUL-terminated path.
            let r = unsafe { libc::mkdir(d.as_ptr(), 0o755) };
            if r < 0 && errno() != libc::EEXIST {
                return Err((Step::Mount, errno(), c_int::try_from(i).unwrap_or(-1)));
            }
        }
        if m.create_file {
            // SAFETY: NUL-terminated path; the fd is closed at once.
            let fd =
                unsafe { libc::open(t, libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666) };
            check(fd, Step::Mount, i)?;
            // SAFETY: closes the fd just opened.
            unsafe { libc::close(fd) };
        }
        check(
            sys_mount(ptr(&m.source), t, ptr(&m.fstype), m.flags, ptr(&m.data)),
            Step::Mount,
            i,
        )?;
        if let Some(f) = m.remount {
            check(sys_mount(none, t, none, f, none), Step::Mount, i)?;
        }
        if let Some(p) = m.propagation {
            check(sys_mount(none, t, none, p, none), Step::Mount, i)?;
        }
    }
    if let Some(h) = &plan.hostname {
        // SAFETY: `h` is live for the call and its length is passed.
        let r = unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) };
        check(r, Step::SetHostname, 0)?;
    }
    for (i, (path, value)) in plan.sysctl.iter().enumerate() {
        // SAFETY: NUL-terminated path; the write reads `value`'s bytes.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        check(fd, Step::Sysctl, i)?;
        let bytes = value.as_bytes();
        // SAFETY: as above; `fd` was just opened.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        // SAFETY: closes the fd just opened.
        unsafe { libc::close(fd) };
        check(if n < 0 { -1 } else { 0 }, Step::Sysctl, i)?;
    }
    for (i, p) in plan.masked.iter().enumerate() {
        // SAFETY: a zeroed stat is a valid out-buffer; the path is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a system call on integers and live, NUL-terminated data.
        if unsafe { libc::stat(p.as_ptr(), &mut st) } < 0 {
            if errno() == libc::ENOENT {
                continue;
            }
            return Err((Step::MaskPath, errno(), c_int::try_from(i).unwrap_or(-1)));
        }
        let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            sys_mount(
                c"tmpfs".as_ptr(),
                p.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                none,
            )
        } else {
            sys_mount(c"/dev/null".as_ptr(), p.as_ptr(), none, libc::MS_BIND, none)
        };
        check(r, Step::MaskPath, i)?;
    }
    for (i, p) in plan.readonly.iter().enumerate() {
        let r = sys_mount(
            p.as_ptr(),
            p.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            none,
        );
        if r < 0 && errno() == libc::ENOENT {
            continue;
        }
        check(r, Step::ReadonlyPath, i)?;
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        check(
            sys_mount(none, p.as_ptr(), none, flags, none),
            Step::ReadonlyPath,
            i,
        )?;
    }
    for (i, (target, link)) in plan.symlinks.iter().enumerate() {
        // SAFETY: NUL-terminated paths. An existing link (from the image) is kept.
        let r = unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
        if r < 0 && errno() != libc::EEXIST {
            return Err((Step::Mount, errno(), c_int::try_from(i).unwrap_or(-1)));
        }
    }
    change_root(plan.rootfs.as_ptr())?;
    if plan.root_readonly {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        check(
            sys_mount(none, root, none, flags, none),
            Step::ReadonlyRoot,
            0,
        )?;
    }
    Ok(())
}

/// pivot_root into `rootfs`; from an initramfs, where pivot_root is refused (EINVAL), the
/// root is moved over `/` and chrooted into instead (as `switch_root` does).
fn change_root(rootfs: *const c_char) -> ChildResult {
    let dot = c".".as_ptr();
    // SAFETY: NUL-terminated paths only.
    check(unsafe { libc::chdir(rootfs) }, Step::ChangeRoot, 0)?;
    // SAFETY: pivot_root(".", ".") with NUL-terminated paths.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, dot, dot) };
    if r == 0 {
        // SAFETY: detaches the old root now stacked under the new one.
        check(
            // SAFETY: a system call on integers and live, NUL-terminated data.
            unsafe { libc::umount2(dot, libc::MNT_DETACH) },
            Step::ChangeRoot,
            1,
        )?;
    } else if errno() == libc::EINVAL {
        let none = std::ptr::null();
        check(
            sys_mount(dot, c"/".as_ptr(), none, libc::MS_MOVE, none),
            Step::ChangeRoot,
            2,
        )?;
        // SAFETY: NUL-terminated path.
        check(unsafe { libc::chroot(dot) }, Step::ChangeRoot, 3)?;
    } else {
        return Err((Step::ChangeRoot, errno(), 4));
    }
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, Step::ChangeRoot, 5)
}

/// A child's stack; the child runs on it until exec.
const STACK: usize = 256 << 10;

/// A pipe whose ends are close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("create", "a pipe", e))
}

type ChildFn<'a> = &'a mut dyn FnMut() -> c_int;

extern "C" fn trampoline(data: *mut libc::c_void) -> c_int {
    // SAFETY: `data` is the `&mut ChildFn` that `raw_clone` passed, alive in this child's copy
    // of the parent's memory.
    let f = unsafe { &mut *data.cast::<ChildFn<'_>>() };
    f()
}

/// clone(2) running `f` on `stack` in the child. Unlike `nix::sched::clone` nothing is boxed,
/// so nothing is freed in a child of a multithreaded process.
///
/// # Safety
/// `f` must only make system calls and must not return into Rust code that frees or unwinds.
unsafe fn raw_clone(mut f: ChildFn<'_>, stack: &mut [u8], flags: c_int) -> nix::Result<Pid> {
    let top = stack.as_mut_ptr().wrapping_add(stack.len());
    let top = top.wrapping_sub(top as usize % 16);
    let data: *mut ChildFn<'_> = &mut f;
    // SAFETY: the stack is live and ours; `data` outlives the call in the parent and is copied
    // into the child.
    let ret = unsafe { libc::clone(trampoline, top.cast(), flags | libc::SIGCHLD, data.cast()) };
    nix::errno::Errno::result(ret).map(Pid::from_raw)
}

/// A container's init, cloned and parked: its pid, the write end that starts it, and the
/// read end of its status.
#[derive(Debug)]
pub(super) struct ParkedInit {
    pub(super) pid: Pid,
    pub(super) start: OwnedFd,
    pub(super) status: OwnedFd,
}

/// Clones the init of `plan` into new namespaces (`flags`). Call with the reaper's lock held
/// (the pipes made here must not leak into another child), then [`wait_ready`].
pub(super) fn clone_init(
    plan: &InitPlan,
    flags: CloneFlags,
    stdio: ChildStdio,
    cgroup_procs: &OwnedFd,
) -> Result<ParkedInit> {
    let (status_r, status_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let ptrs = plan.exec.ptrs();
    let mut stack = vec![0u8; STACK];
    let (sw, sr, cg) = (
        status_w.as_raw_fd(),
        start_r.as_raw_fd(),
        cgroup_procs.as_raw_fd(),
    );
    let mut child = || -> c_int {
        if let Err(e) = init_setup(plan, cg) {
            fail(sw, e);
        }
        if let Err(e) = arrange_fds(stdio, sw, Some(sr)) {
            fail(sw, e);
        }
        report(3, READY, 0, 0, 0);
        let mut go = [0u8; 1];
        // SAFETY: reads one byte into a live buffer.
        if unsafe { libc::read(4, go.as_mut_ptr().cast(), 1) } != 1 {
            // The container was removed before it started.
            // SAFETY: see `fail`.
            unsafe { libc::_exit(1) }
        }
        // SAFETY: closes the start pipe, no longer needed.
        unsafe { libc::close(4) };
        let e = become_process(&plan.exec, &ptrs);
        fail(3, e)
    };
    // SAFETY: the child only makes system calls on data made before the clone (see the
    // module's comment), on its own stack, and ends in exec or _exit.
    let pid = unsafe { raw_clone(&mut child, &mut stack, flags.bits()) }
        .map_err(|e| Error::sys("clone", "a container's init", e))?;
    drop(status_w);
    drop(start_r);
    Ok(ParkedInit {
        pid,
        start: start_w,
        status: status_r,
    })
}

/// A process cloned into a running container: its pid and the read end of its status (see
/// [`wait_exec`]).
#[derive(Debug)]
pub(super) struct Joined {
    pub(super) pid: Pid,
    pub(super) status: OwnedFd,
}

/// Clones a helper that joins a running container and clones the process there with
/// `CLONE_PARENT` (so the agent is its parent), reports its pid and exits (and is waited for
/// here). Call with the reaper's lock held, and watch the answered pid before releasing it.
pub(super) fn clone_into(
    plan: &JoinPlan,
    stdio: ChildStdio,
    cgroup_procs: &OwnedFd,
) -> Result<Joined> {
    let (status_r, status_w) = pipe()?;
    let ptrs = plan.exec.ptrs();
    let mut stack = vec![0u8; STACK];
    let mut inner_stack = vec![0u8; STACK];
    let sw = status_w.as_raw_fd();
    let cg = cgroup_procs.as_raw_fd();
    let ns: Vec<RawFd> = plan.namespaces.iter().map(AsRawFd::as_raw_fd).collect();
    let root = plan.root.as_raw_fd();
    let mut inner = || -> c_int {
        if let Err(e) = arrange_fds(stdio, sw, None) {
            fail(sw, e);
        }
        let e = become_process(&plan.exec, &ptrs);
        fail(3, e)
    };
    let mut helper = || -> c_int {
        // SAFETY: writes one byte from a static string.
        let n = unsafe { libc::write(cg, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            fail(sw, (Step::JoinCgroup, errno(), 0));
        }
        for (i, fd) in ns.iter().enumerate() {
            // SAFETY: setns on an open namespace fd.
            if unsafe { libc::setns(*fd, 0) } < 0 {
                fail(
                    sw,
                    (
                        Step::JoinNamespace,
                        errno(),
                        c_int::try_from(i).unwrap_or(-1),
                    ),
                );
            }
        }
        // SAFETY: fchdir to an open directory, then chroot to it.
        if unsafe { libc::fchdir(root) } < 0 || unsafe { libc::chroot(c".".as_ptr()) } < 0 {
            fail(sw, (Step::ChangeRoot, errno(), 0));
        }
        // SAFETY: as for the outer clone: the stack is this child's copy of one made before.
        match unsafe { raw_clone(&mut inner, &mut inner_stack, libc::CLONE_PARENT) } {
            Ok(pid) => {
                report(sw, PID, 0, pid.as_raw(), 0);
                // SAFETY: see `fail`.
                unsafe { libc::_exit(0) }
            }
            Err(e) => fail(sw, (Step::Clone, e as c_int, 0)),
        }
    };
    // SAFETY: as in `clone_init`.
    let helper_pid = unsafe { raw_clone(&mut helper, &mut stack, 0) }
        .map_err(|e| Error::sys("clone", "into a container", e))?;
    drop(status_w);
    let mut rec = [0u8; RECORD];
    let got = read_record(&status_r, &mut rec);
    // The helper has exited or is about to. As PID 1 the reaper may reap it first: then
    // there is nothing left to wait for.
    let _ = nix::sys::wait::waitpid(helper_pid, None);
    let pid = match got? {
        Some((PID, _, pid, _)) => Pid::from_raw(pid),
        Some((FAILED, step, e, arg)) => return Err(child_error(step, e, arg)),
        _ => {
            return Err(Error::io(
                "start",
                "a process in the container",
                std::io::Error::other("the helper died"),
            ))
        }
    };
    Ok(Joined {
        pid,
        status: status_r,
    })
}

fn read_record(fd: &OwnedFd, rec: &mut [u8; RECORD]) -> Result<Option<(u32, u32, c_int, c_int)>> {
    let mut at = 0;
    while at < RECORD {
        match nix::unistd::read(fd.as_raw_fd(), &mut rec[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::sys("read", "a child's status", e)),
        }
    }
    if at < RECORD {
        return Ok(None);
    }
    let word = |i: usize| [rec[i], rec[i + 1], rec[i + 2], rec[i + 3]];
    Ok(Some((
        u32::from_ne_bytes(word(0)),
        u32::from_ne_bytes(word(4)),
        c_int::from_ne_bytes(word(8)),
        c_int::from_ne_bytes(word(12)),
    )))
}

fn child_error(step: u32, e: c_int, arg: c_int) -> Error {
    let what = Step::from_wire(step).map_or("set up", Step::what);
    let errno = nix::errno::Errno::from_raw(e);
    match Step::from_wire(step) {
        Some(Step::Exec) if errno == nix::errno::Errno::ENOENT => Error::Spawn {
            program: "the container's program".into(),
            source: std::io::Error::from_raw_os_error(e),
        },
        Some(Step::Mount | Step::Sysctl | Step::Rlimit | Step::MaskPath | Step::ReadonlyPath) => {
            Error::sys(what, format!("(entry {arg}) in the container"), errno)
        }
        _ => Error::sys(what, "in the container", errno),
    }
}

/// Blocks until a parked init reports that it is ready (or why it failed).
pub(super) fn wait_ready(init: &ParkedInit) -> Result<()> {
    let mut rec = [0u8; RECORD];
    match read_record(&init.status, &mut rec)? {
        Some((READY, ..)) => Ok(()),
        Some((FAILED, step, e, arg)) => Err(child_error(step, e, arg)),
        _ => Err(Error::io(
            "create",
            "the container's init",
            std::io::Error::other("it died before it was ready"),
        )),
    }
}

/// Blocks until a process started by [`clone_into`] or a started init has exec'd (the
/// status pipe's end) or reports why it could not.
pub(super) fn wait_exec(status: &OwnedFd) -> Result<()> {
    let mut rec = [0u8; RECORD];
    match read_record(status, &mut rec)? {
        None => Ok(()),
        Some((FAILED, step, e, arg)) => Err(child_error(step, e, arg)),
        Some(_) => Err(Error::io(
            "start",
            "a container process",
            std::io::Error::other("unexpected status record"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn every_step_survives_the_wire() {
        for (i, s) in Step::ALL.into_iter().enumerate() {
            assert_eq!(s as u32, i as u32 + 1);
            assert_eq!(Step::from_wire(s as u32), Some(s));
        }
        assert_eq!(Step::from_wire(0), None);
        assert_eq!(Step::from_wire(Step::ALL.len() as u32 + 1), None);
    }
}
