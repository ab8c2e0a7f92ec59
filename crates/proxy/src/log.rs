//! The console log file and the in-memory tail of the last console lines.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;

/// Suffix of the previous chunk of a console log that reached its cap (`console.log.1`).
pub const ROTATED_SUFFIX: &str = ".1";

/// The path the previous chunk of the console log at `log` is kept at: `<log>.1`.
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(ROTATED_SUFFIX);
    PathBuf::from(name)
}

/// A console log bounded to two chunks: when writing would take the file past `cap` bytes it
/// is renamed to `<path>.1` (replacing an older one) and a new file is begun, so at most
/// about `2 * cap` bytes are kept and the newest lines are always in `<path>`. Opened for
/// appending, so a VM handed to another process keeps one log; only the process running the
/// proxy writes it. Every write goes through tokio's blocking pool.
#[derive(Debug)]
pub(crate) struct ConsoleLog {
    path: PathBuf,
    file: File,
    /// Bytes in the current chunk.
    len: u64,
    cap: u64,
}

impl ConsoleLog {
    /// Opens (creating or appending to) the log at `path`, capped at `cap` bytes per chunk.
    pub(crate) async fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = open_append(path).await?;
        let len = file.metadata().await?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            len,
            cap: cap.max(1),
        })
    }

    /// Appends `lines`, each with a `\n`, rotating first if they would pass the cap.
    pub(crate) async fn write_lines(&mut self, lines: &[String]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        if self.len > 0 && self.len + buf.len() as u64 > self.cap {
            self.rotate().await?;
        }
        self.file.write_all(&buf).await?;
        // tokio's `File` finishes a write in the background; flushing waits for it, so what
        // is returned here is in the file (a reader, or a post-mortem, sees it).
        self.file.flush().await?;
        self.len += buf.len() as u64;
        Ok(())
    }

    async fn rotate(&mut self) -> io::Result<()> {
        self.file.flush().await?;
        tokio::fs::rename(&self.path, rotated_path(&self.path)).await?;
        self.file = open_append(&self.path).await?;
        self.len = 0;
        Ok(())
    }
}

async fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// The last `cap` console lines, shared between the reader task and the proxy's handle.
#[derive(Debug)]
pub(crate) struct Tail {
    lines: Mutex<VecDeque<String>>,
    cap: usize,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            lines: Mutex::new(VecDeque::with_capacity(cap)),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, line: &str) {
        if self.cap == 0 {
            return;
        }
        let mut lines = self.lock();
        if lines.len() == self.cap {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: std::ops::Range<usize>) -> Vec<String> {
        n.map(|i| format!("line {i:03}")).collect()
    }

    #[tokio::test]
    async fn log_rotates_at_the_cap_and_keeps_the_previous_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // Each line is 9 bytes with its newline: 4 fit in 40 bytes.
        let mut log = ConsoleLog::open(&path, 40).await.unwrap();
        log.write_lines(&lines(0..4)).await.unwrap();
        assert!(!rotated_path(&path).exists());
        log.write_lines(&lines(4..6)).await.unwrap();
        let old = std::fs::read_to_string(rotated_path(&path)).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old, lines(0..4).join("\n") + "\n");
        assert_eq!(new, lines(4..6).join("\n") + "\n");
        for i in 6..100 {
            log.write_lines(&lines(i..i + 1)).await.unwrap();
        }
        let old_len = std::fs::metadata(rotated_path(&path)).unwrap().len();
        let new_len = std::fs::metadata(&path).unwrap().len();
        assert!(old_len <= 40 && new_len <= 40, "{old_len} {new_len}");
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("line 099\n"));
    }

    #[tokio::test]
    async fn log_appends_to_an_existing_file_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "before handover\n").unwrap();
        let mut log = ConsoleLog::open(&path, 1 << 20).await.unwrap();
        log.write_lines(&["after".to_owned()]).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "before handover\nafter\n"
        );
        // A single batch larger than the cap still lands (in a fresh chunk).
        let mut small = ConsoleLog::open(&path, 8).await.unwrap();
        small.write_lines(&lines(0..3)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(rotated_path(&path)).unwrap(),
            "before handover\nafter\n"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let tail = Tail::new(3);
        for l in lines(0..5) {
            tail.push(&l);
        }
        assert_eq!(tail.lines(), lines(2..5));
        tail.clear();
        assert!(tail.lines().is_empty());
        let none = Tail::new(0);
        none.push("x");
        assert!(none.lines().is_empty());
    }
}
