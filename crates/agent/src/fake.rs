//! [`FakeAgent`]: an in-memory [`Agent`] for other crates' unit tests (feature `test-utils`).

use std::any::Any;
use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::client::Agent;
use crate::error::{Error, Result};
use crate::types::{AgentDetails, GuestDetails, HealthStatus, Resources, Uptime, VersionInfo};

/// One call recorded by a [`FakeAgent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// [`Agent::connect`].
    Connect,
    /// [`Agent::check`].
    Check,
    /// [`Agent::version`].
    Version,
    /// [`Agent::online_cpu_mem`].
    OnlineCpuMem {
        /// `wait` argument.
        wait: bool,
        /// `nb_cpus` argument.
        nb_cpus: u32,
        /// `cpu_only` argument.
        cpu_only: bool,
    },
    /// [`Agent::reseed_random_dev`] with its data.
    ReseedRandomDev(Vec<u8>),
    /// [`Agent::set_guest_date_time`] with its time.
    SetGuestDateTime(SystemTime),
    /// [`Agent::get_guest_details`].
    GetGuestDetails,
    /// [`Agent::random`] with its length.
    Random(u32),
    /// [`Agent::guest_time`].
    GuestTime,
    /// [`Agent::resources`].
    Resources,
    /// [`Agent::uptime`].
    Uptime,
    /// [`Agent::disconnect`].
    Disconnect,
    /// [`Agent::reuse_agent`].
    ReuseAgent,
}

impl FakeCall {
    /// The method name, as given to [`FakeAgent::fail`].
    pub fn method(&self) -> &'static str {
        match self {
            FakeCall::Connect => "connect",
            FakeCall::Check => "check",
            FakeCall::Version => "version",
            FakeCall::OnlineCpuMem { .. } => "online_cpu_mem",
            FakeCall::ReseedRandomDev(_) => "reseed_random_dev",
            FakeCall::SetGuestDateTime(_) => "set_guest_date_time",
            FakeCall::GetGuestDetails => "get_guest_details",
            FakeCall::Random(_) => "random",
            FakeCall::GuestTime => "guest_time",
            FakeCall::Resources => "resources",
            FakeCall::Uptime => "uptime",
            FakeCall::Disconnect => "disconnect",
            FakeCall::ReuseAgent => "reuse_agent",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<FakeCall>,
    failing: HashSet<&'static str>,
    hanging: HashSet<&'static str>,
    connected: bool,
    resources: Resources,
    clock_offset: Option<SystemTime>,
}

/// An [`Agent`] that records its calls, answers plausibly, and fails the methods it is told to
/// fail with [`Error::Injected`].
#[derive(Debug)]
pub struct FakeAgent {
    state: Mutex<State>,
    started: std::time::Instant,
}

impl Default for FakeAgent {
    fn default() -> Self {
        FakeAgent::new()
    }
}

impl FakeAgent {
    /// A fake guest with one online CPU and 256 MiB.
    pub fn new() -> Self {
        let resources = Resources {
            online_cpus: vec![0],
            mem_total_kb: 256 * 1024,
            online_memory_blocks: 2,
            memory_block_size_bytes: 128 << 20,
            ..Default::default()
        };
        FakeAgent {
            state: Mutex::new(State {
                resources,
                ..Default::default()
            }),
            started: std::time::Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every later call of `method` (an [`Agent`] method name, see [`FakeCall::method`])
    /// fail with [`Error::Injected`].
    pub fn fail(&self, method: &'static str) {
        self.lock().failing.insert(method);
    }

    /// Makes every later call of `method` hang: recorded, then never answered, as by a guest
    /// that stopped answering (or a VM that died under the call).
    pub fn hang(&self, method: &'static str) {
        self.lock().hanging.insert(method);
    }

    /// Stops failing or hanging `method`.
    pub fn heal(&self, method: &'static str) {
        let mut st = self.lock();
        st.failing.remove(method);
        st.hanging.remove(method);
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// How many times `method` was called.
    pub fn count(&self, method: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method() == method)
            .count()
    }

    /// True between a successful call and [`Agent::disconnect`].
    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    /// Replaces the resources the fake guest reports.
    pub fn set_resources(&self, r: Resources) {
        self.lock().resources = r;
    }

    /// Records `call`, then hangs if its method is to hang, fails if it is to fail.
    async fn record(&self, call: FakeCall) -> Result<MutexGuard<'_, State>> {
        let method = call.method();
        let hang = {
            let mut st = self.lock();
            st.calls.push(call);
            st.hanging.contains(method)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let mut st = self.lock();
        if st.failing.contains(method) {
            return Err(Error::Injected { method });
        }
        if method != "disconnect" {
            st.connected = true;
        }
        Ok(st)
    }
}

#[async_trait]
impl Agent for FakeAgent {
    async fn connect(&self) -> Result<()> {
        self.record(FakeCall::Connect).await.map(|_| ())
    }

    async fn check(&self) -> Result<HealthStatus> {
        self.record(FakeCall::Check)
            .await
            .map(|_| HealthStatus::Serving)
    }

    async fn version(&self) -> Result<VersionInfo> {
        self.record(FakeCall::Version).await.map(|_| VersionInfo {
            grpc_version: "fake".into(),
            agent_version: crate::VERSION.into(),
        })
    }

    async fn online_cpu_mem(&self, wait: bool, nb_cpus: u32, cpu_only: bool) -> Result<()> {
        let mut st = self
            .record(FakeCall::OnlineCpuMem {
                wait,
                nb_cpus,
                cpu_only,
            })
            .await?;
        let mut onlined = 0;
        while onlined < nb_cpus {
            match st.resources.offline_cpus.first().copied() {
                Some(cpu) => {
                    st.resources.offline_cpus.remove(0);
                    st.resources.online_cpus.push(cpu);
                }
                None => {
                    let next = st.resources.online_cpus.iter().max().map_or(0, |m| m + 1);
                    st.resources.online_cpus.push(next);
                }
            }
            onlined += 1;
        }
        st.resources.online_cpus.sort_unstable();
        if !cpu_only {
            st.resources.online_memory_blocks += st.resources.offline_memory_blocks;
            st.resources.offline_memory_blocks = 0;
        }
        Ok(())
    }

    async fn reseed_random_dev(&self, data: &[u8]) -> Result<()> {
        self.record(FakeCall::ReseedRandomDev(data.to_vec()))
            .await
            .map(|_| ())
    }

    async fn set_guest_date_time(&self, t: SystemTime) -> Result<()> {
        let mut st = self.record(FakeCall::SetGuestDateTime(t)).await?;
        st.clock_offset = Some(t);
        Ok(())
    }

    async fn get_guest_details(&self) -> Result<GuestDetails> {
        let st = self.record(FakeCall::GetGuestDetails).await?;
        Ok(GuestDetails {
            mem_block_size_bytes: st.resources.memory_block_size_bytes,
            agent_details: Some(AgentDetails {
                version: crate::VERSION.into(),
                init_daemon: true,
                ..Default::default()
            }),
            support_mem_hotplug_probe: false,
        })
    }

    async fn random(&self, len: u32) -> Result<Vec<u8>> {
        let st = self.record(FakeCall::Random(len)).await?;
        let seed = st.calls.len() as u8;
        Ok((0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect())
    }

    async fn guest_time(&self) -> Result<SystemTime> {
        let st = self.record(FakeCall::GuestTime).await?;
        Ok(st.clock_offset.unwrap_or_else(SystemTime::now))
    }

    async fn resources(&self) -> Result<Resources> {
        self.record(FakeCall::Resources)
            .await
            .map(|st| st.resources.clone())
    }

    async fn uptime(&self) -> Result<Uptime> {
        drop(self.record(FakeCall::Uptime).await?);
        let agent = self.started.elapsed();
        Ok(Uptime {
            agent,
            system: agent + Duration::from_millis(100),
        })
    }

    async fn disconnect(&self) -> Result<()> {
        let mut st = self.record(FakeCall::Disconnect).await?;
        st.connected = false;
        Ok(())
    }

    async fn reuse_agent(&self, other: &dyn Agent) -> Result<()> {
        let connected = match other.as_any().downcast_ref::<FakeAgent>() {
            Some(o) if std::ptr::eq(o, self) => self.lock().connected,
            Some(o) => o.is_connected(),
            None => return Err(Error::Unsupported("reusing a non-fake agent")),
        };
        let mut st = self.record(FakeCall::ReuseAgent).await?;
        st.connected = connected;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_and_fails_on_demand() {
        let a = FakeAgent::new();
        assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
        a.fail("online_cpu_mem");
        assert!(matches!(
            a.online_cpu_mem(true, 1, false).await,
            Err(Error::Injected {
                method: "online_cpu_mem"
            })
        ));
        a.heal("online_cpu_mem");
        a.online_cpu_mem(true, 2, false).await.expect("online");
        assert_eq!(a.resources().await.expect("res").online_cpus, vec![0, 1, 2]);
        assert_eq!(a.count("online_cpu_mem"), 2);
        assert_eq!(a.calls()[0], FakeCall::Check);
        a.disconnect().await.expect("disconnect");
        assert!(!a.is_connected());
        a.hang("check");
        let hung = tokio::time::timeout(Duration::from_millis(20), a.check()).await;
        assert!(hung.is_err(), "a hanging call does not answer");
        assert_eq!(a.count("check"), 2, "but is recorded");
        a.heal("check");
        a.check().await.expect("healed");
    }

    #[tokio::test]
    async fn usable_as_dyn_agent() {
        let a: std::sync::Arc<dyn Agent> = std::sync::Arc::new(FakeAgent::new());
        let b = FakeAgent::new();
        a.check().await.expect("check");
        b.reuse_agent(a.as_ref()).await.expect("reuse");
        assert!(b.is_connected());
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        a.set_guest_date_time(t).await.expect("set");
        assert_eq!(a.guest_time().await.expect("time"), t);
        assert_eq!(a.random(4).await.expect("random").len(), 4);
    }
}
