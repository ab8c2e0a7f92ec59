//! Attaching the terminal to a process in a VM, as `docker run`/`docker exec` do: stdin (with
//! `-i`), stdout and stderr streamed, a raw local terminal and window-size changes with `-t`,
//! Ctrl-C (SIGINT) and SIGTERM forwarded to the process. Shared by `run` and `exec`.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use vmfactory_vm::{ExitStatus, Process, ProcessSpec};

/// How a process was started from the command line.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    /// `-i`: forward our stdin.
    pub interactive: bool,
    /// `-t`: a terminal in the guest, ours in raw mode.
    pub tty: bool,
}

/// How the attachment ended.
#[derive(Debug)]
pub enum Ended {
    /// The process ended so.
    Exited(ExitStatus),
    /// A second Ctrl-C (or SIGTERM twice): the user wants out now.
    Abandoned,
}

impl Ended {
    /// The exit code of the command line: the process's code, 128 + N for signal N, 130 when
    /// abandoned (as a shell reports an interrupted command).
    pub fn code(&self) -> u8 {
        match self {
            Ended::Exited(ExitStatus::Code(c)) => u8::try_from(*c).unwrap_or(255),
            Ended::Exited(ExitStatus::Signal(s)) => u8::try_from(128 + s).unwrap_or(255),
            Ended::Abandoned => 130,
        }
    }
}

/// Signals a command line watches while a process runs.
pub struct Signals {
    int: Signal,
    term: Signal,
    winch: Signal,
}

impl Signals {
    /// Installs the handlers (before anything is started: from then on Ctrl-C no longer kills
    /// us, so nothing started is left behind).
    pub fn install() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("Cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("Cannot handle SIGTERM")?,
            winch: signal(SignalKind::window_change()).context("Cannot handle SIGWINCH")?,
        })
    }
}

/// Our terminal's size (rows, columns), if stdout or stdin is a terminal.
fn window_size() -> Option<(u32, u32)> {
    mod ioctl {
        nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
    }
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer; a non-terminal fd fails.
        if unsafe { ioctl::tiocgwinsz(fd, &mut ws) }.is_ok() && ws.ws_row > 0 {
            return Some((u32::from(ws.ws_row), u32::from(ws.ws_col)));
        }
    }
    None
}

/// Our terminal in raw mode while alive (with `-t` on a terminal), restored on drop.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter(tty: bool) -> Self {
        let stdin = std::io::stdin();
        if !tty {
            return RawMode(None);
        }
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None); // Not a terminal: nothing to switch.
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// Fills in what `-t` means for the spec: a terminal of our size (24x80 without one).
pub fn terminal_spec(spec: &mut ProcessSpec, stdio: &Stdio) {
    spec.terminal = stdio.tty;
    if stdio.tty {
        spec.console_size = Some(window_size().unwrap_or((24, 80)));
        if !spec.env.iter().any(|e| e.starts_with("TERM=")) {
            let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
            spec.env.push(format!("TERM={term}"));
        }
    }
}

/// Streams the process's stdio to ours until it ends; Ctrl-C or SIGTERM sends SIGINT/SIGTERM
/// to it, a second one abandons it.
pub async fn attach(mut p: Process, stdio: &Stdio, signals: &mut Signals) -> Result<Ended> {
    let raw = RawMode::enter(stdio.tty);
    let stdin = p.stdin().context("The process's stdin is taken")?;
    if stdio.interactive {
        let mut stdin = stdin;
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut stdin).await;
            let _ = stdin.shutdown().await;
        });
    } else {
        drop(stdin); // The process reads EOF at once, as under `docker run` without -i.
    }
    let mut out = p.stdout().context("The process's stdout is taken")?;
    let mut err = p.stderr().context("The process's stderr is taken")?;
    let copy_out = async {
        let mut o = tokio::io::stdout();
        let r = tokio::io::copy(&mut out, &mut o).await;
        let _ = o.flush().await;
        r
    };
    let copy_err = async {
        let mut e = tokio::io::stderr();
        let r = tokio::io::copy(&mut err, &mut e).await;
        let _ = e.flush().await;
        r
    };
    let streams = async { tokio::join!(copy_out, copy_err) };
    tokio::pin!(streams);
    let wait = p.wait();
    tokio::pin!(wait);
    let mut status = None;
    let mut streams_done = false;
    let mut interrupts = 0;
    let ended = loop {
        if streams_done {
            if let Some(st) = status {
                break Ended::Exited(st);
            }
        }
        tokio::select! {
            (o, e) = &mut streams, if !streams_done => {
                streams_done = true;
                o.context("Cannot stream the process's stdout")?;
                e.context("Cannot stream the process's stderr")?;
            }
            st = &mut wait, if status.is_none() => {
                status = Some(st.context("Cannot wait for the process")?);
            }
            _ = signals.int.recv() => {
                interrupts += 1;
                if interrupts > 1 {
                    break Ended::Abandoned;
                }
                p.signal(libc::SIGINT).await.context("Cannot forward Ctrl-C")?;
            }
            _ = signals.term.recv() => {
                interrupts += 1;
                if interrupts > 1 {
                    break Ended::Abandoned;
                }
                p.signal(libc::SIGTERM).await.context("Cannot forward SIGTERM")?;
            }
            _ = signals.winch.recv() => {
                if let (true, Some((rows, cols))) = (stdio.tty, window_size()) {
                    p.resize(rows, cols).await.context("Cannot resize the terminal")?;
                }
            }
        }
    };
    drop(raw);
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Ended::Exited(ExitStatus::Code(0)).code(), 0);
        assert_eq!(Ended::Exited(ExitStatus::Code(42)).code(), 42);
        assert_eq!(Ended::Exited(ExitStatus::Signal(9)).code(), 137);
        assert_eq!(Ended::Exited(ExitStatus::Code(300)).code(), 255);
        assert_eq!(Ended::Abandoned.code(), 130);
    }
}
