//! Request types of the workload calls: processes (Kata's `ExecProcess` family), files
//! (`CopyFile` in, our `ReadFile` out) and storages (a hot-plugged disk mounted by the agent).
//!
//! Every process call names a container by its `container_id`: empty for the VM's own root,
//! else a container made by `CreateContainer`; within it, processes are told apart by
//! their `exec_id`.

/// The largest chunk one `ReadStdout`, `ReadStderr`, `ReadFile` or `CopyFile` carries. ttRPC
/// frames are limited to 4 MiB; smaller chunks also bound the agent's memory per stream.
pub const MAX_CHUNK: u32 = 1 << 20;

/// A process to start in the guest (Kata's `oci.Process`, the fields vmfactory uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessSpec {
    /// The container the process runs in: empty for the VM's own root.
    pub container_id: String,
    /// The program and its arguments; the program is looked up in the `PATH` of `env`.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs: the whole environment. The agent adds a default `PATH` when none is
    /// given.
    pub env: Vec<String>,
    /// Working directory; empty means `/`.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Run on a pseudo-terminal: stdout and stderr are then one stream, read as stdout.
    pub terminal: bool,
    /// Initial terminal size (rows, columns), with `terminal`.
    pub console_size: Option<(u32, u32)>,
}

impl ProcessSpec {
    /// A process running `args` as root in `/`, without a terminal.
    pub fn new<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ProcessSpec {
            args: args.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// One chunk of a file copied into the guest (Kata's `CopyFileRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyFileChunk {
    /// Absolute destination path.
    pub path: String,
    /// The size of the whole file: the agent renames its temporary file into place when the
    /// chunks written reach it.
    pub file_size: u64,
    /// Permission bits of the file.
    pub file_mode: u32,
    /// Permission bits of parent directories the copy creates.
    pub dir_mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Where `data` goes in the file.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// One chunk of a file read back out of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileChunk {
    /// The bytes; shorter than asked at the end of the file.
    pub data: Vec<u8>,
    /// The file's size when the chunk was read.
    pub file_size: u64,
    /// The file's permission bits.
    pub file_mode: u32,
}

/// A storage for the agent to mount (Kata's `Storage` message).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Storage {
    /// How the storage reaches the guest: [`Storage::BLK`] for a virtio-blk PCI device.
    pub driver: String,
    /// Where to find it: for `blk`, the device's PCI path (`"05/00"`).
    pub source: String,
    /// File system type (`ext4`).
    pub fstype: String,
    /// Mount options (`ro`, `noexec`, …, or file-system data such as `errors=remount-ro`).
    pub options: Vec<String>,
    /// Absolute mount point; created if missing.
    pub mount_point: String,
}

impl Storage {
    /// Kata's driver name for a virtio-blk PCI device.
    pub const BLK: &'static str = "blk";
}

/// How a process ended, as `WaitProcess` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal (reported on the wire as 128 + N).
    Signal(i32),
}

impl ExitStatus {
    /// Decodes Kata's wire form: 0–128 are exit codes, 129–255 are 128 + a signal number (a
    /// shell reports both the same way, so "exit 130" reads as SIGINT: the wire cannot tell).
    pub fn from_wire(status: i32) -> Self {
        if (129..=128 + 64).contains(&status) {
            ExitStatus::Signal(status - 128)
        } else {
            ExitStatus::Code(status)
        }
    }

    /// Kata's wire form: the code, or 128 + the signal.
    pub fn to_wire(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }

    /// True for exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_wire_form() {
        for (wire, st) in [
            (0, ExitStatus::Code(0)),
            (42, ExitStatus::Code(42)),
            (128, ExitStatus::Code(128)),
            (137, ExitStatus::Signal(9)),
            (130, ExitStatus::Signal(2)),
            (255, ExitStatus::Code(255)),
        ] {
            assert_eq!(ExitStatus::from_wire(wire), st, "{wire}");
            assert_eq!(st.to_wire(), wire);
        }
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(9).success());
    }
}
