//! `vmfactory-agent`: the guest agent binary.
//!
//! As PID 1 (the guest's `/init`) it mounts proc, sys, dev, devpts, /tmp and /run, loads the
//! modules listed in `/lib/modules/load-order`, prints `vmfactory-agent: ready`, reaps children
//! and serves the agent protocol forever. Run by hand on a host it only serves, on the
//! endpoints given by flags.

use std::process::ExitCode;
use std::time::Duration;

use tracing::{error, info};
use vmfactory_agent::READY_LINE;
use vmfactory_guest::console::{console_line, source_chain};
use vmfactory_guest::init;
use vmfactory_guest::server::{serve_guest, serve_unix, GuestConfig};

const USAGE: &str = "\
usage: vmfactory-agent [--init] [--serve-unix PATH]
  (no flags, as PID 1)  guest mode: init duties, then serve on agent.channel.0 and vsock:1024
  --init                guest mode even when not PID 1
  --serve-unix PATH     serve on a unix socket at PATH (host testing); no init duties
  --version             print the version";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let pid1 = std::process::id() == 1;
    let mut guest = pid1;
    let mut unix = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--init" => guest = true,
            "--serve-unix" => match it.next() {
                Some(p) => unix = Some(p.clone()),
                None => return usage_error(pid1),
            },
            "--version" => {
                println!("vmfactory-agent {}", vmfactory_agent::VERSION);
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            // The kernel passes unknown command-line words to init: ignore them as PID 1.
            _ if pid1 => {}
            _ => return usage_error(pid1),
        }
    }

    if guest {
        guest_main(pid1)
    } else if let Some(path) = unix {
        host_main(&path)
    } else {
        usage_error(false)
    }
}

fn usage_error(pid1: bool) -> ExitCode {
    eprintln!("{USAGE}");
    if pid1 {
        park_forever()
    }
    ExitCode::from(2)
}

/// Guest mode: never returns when PID 1.
fn guest_main(pid1: bool) -> ExitCode {
    if pid1 {
        init::init_guest();
    }
    console_line(READY_LINE);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            console_line(&format!("vmfactory-agent: cannot start runtime: {e}"));
            park_forever()
        }
    };
    rt.block_on(async move {
        if pid1 {
            // PID 1 reaps every orphan, and hands its own processes' statuses to their waiters.
            let _ = vmfactory_guest::server::reaper::Reaper::global();
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let task = tokio::spawn(serve_guest(GuestConfig::default()));
            match task.await {
                Ok(Ok(())) => info!("guest server stopped"),
                Ok(Err(e)) => {
                    error!(error = %e, "guest server failed");
                    console_line(&format!(
                        "vmfactory-agent: serve failed: {e}: {}",
                        source_chain(&e)
                    ));
                }
                Err(e) => {
                    error!(error = %e, "guest server panicked");
                    console_line(&format!("vmfactory-agent: serve panicked: {e}"));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// Host mode: serve on a unix socket until the process is killed.
fn host_main(path: &str) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmfactory-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve_unix(GuestConfig::default(), path.as_ref())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmfactory-agent: {e}: {}", source_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// PID 1 must never exit (the kernel panics): sleep forever.
fn park_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
