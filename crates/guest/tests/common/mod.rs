//! Shared helpers of the server tests: a fake guest tree, a fake clock, an in-process server.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use vmfactory_agent::{AgentConfig, AgentUrl, KataAgent};
use vmfactory_guest::server::{AgentServer, GuestAgent, GuestClock, GuestConfig, GuestPaths};

/// A settable clock that never touches the host's.
#[derive(Debug)]
pub struct FakeClock(pub Mutex<SystemTime>);

impl GuestClock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().expect("clock lock")
    }

    fn set(&self, t: SystemTime) -> vmfactory_guest::Result<()> {
        *self.0.lock().expect("clock lock") = t;
        Ok(())
    }
}

/// A fake guest under a temp dir: 4 CPUs (cpu0, cpu1 online; cpu2, cpu3 offline), memory
/// blocks (online, offline), 128 MiB blocks, `/dev/urandom` with known bytes.
pub struct FakeGuest {
    pub dir: tempfile::TempDir,
    pub paths: GuestPaths,
    pub clock: Arc<FakeClock>,
}

impl FakeGuest {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = GuestPaths::under(dir.path());
        let cpu = paths.sys.join("devices/system/cpu");
        for (i, online) in [true, true, false, false].iter().enumerate() {
            let d = cpu.join(format!("cpu{i}"));
            fs::create_dir_all(&d).expect("mkdir");
            if i > 0 {
                fs::write(d.join("online"), if *online { "1\n" } else { "0\n" }).expect("w");
            }
        }
        let mem = paths.sys.join("devices/system/memory");
        for (i, state) in ["online", "offline"].iter().enumerate() {
            let d = mem.join(format!("memory{i}"));
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("state"), format!("{state}\n")).expect("w");
        }
        fs::write(mem.join("block_size_bytes"), "8000000\n").expect("w");
        fs::create_dir_all(&paths.proc).expect("mkdir");
        fs::write(paths.proc.join("meminfo"), "MemTotal: 262144 kB\n").expect("w");
        fs::write(paths.proc.join("uptime"), "42.25 1.00\n").expect("w");
        fs::create_dir_all(&paths.dev).expect("mkdir");
        fs::write(paths.dev.join("urandom"), [7u8; 4096]).expect("w");
        fs::write(paths.dev.join("random"), b"").expect("w");
        let clock = Arc::new(FakeClock(Mutex::new(SystemTime::UNIX_EPOCH)));
        FakeGuest { dir, paths, clock }
    }

    pub fn config(&self) -> GuestConfig {
        let mut cfg = GuestConfig::default();
        cfg.paths = self.paths.clone();
        cfg.clock = self.clock.clone();
        cfg.vsock_port = None;
        cfg.online_timeout = Duration::from_millis(300);
        cfg.init_daemon = false;
        cfg
    }

    pub fn agent(&self) -> Arc<GuestAgent> {
        Arc::new(GuestAgent::new(self.config()))
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a server on a unix socket in the temp dir.
    pub async fn serve_unix(&self) -> (AgentServer, PathBuf) {
        let path = self.sock("agent.sock");
        let server = AgentServer::bind_unix(self.agent(), &path)
            .await
            .expect("bind");
        (server, path)
    }

    pub fn cpu_online(&self, n: u32) -> String {
        fs::read_to_string(
            self.paths
                .sys
                .join(format!("devices/system/cpu/cpu{n}/online")),
        )
        .expect("read")
    }
}

pub fn url(scheme: &str, path: &Path) -> AgentUrl {
    AgentUrl::parse(&format!("{scheme}://{}", path.display())).expect("url")
}

pub fn agent(url: AgentUrl, timeout: Duration) -> KataAgent {
    KataAgent::with_config(url, AgentConfig::new(timeout, timeout))
}
