//! Unit tests of the registry (recorded by a cache and a factory on fake VMs) and of the
//! endpoint, scraped over a real unix socket and a real TCP port.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmfactory_hypervisor::wait::wait_until;
use vmfactory_hypervisor::FakeStep;
use vmfactory_vm::{FakeBackends, Vm, VmConfig, MAX_SOCKET_PATH};

use super::*;
use crate::testing::FakeHost;
use crate::{BaseError, BaseKind, CacheFactory, DirectFactory, Factory, FactoryConfig, Prestarted};

fn count(text: &str, source: &str) -> Option<f64> {
    sample(
        text,
        &format!("vmfactory_get_vm_total{{source=\"{source}\"}}"),
    )
}

fn bucket(text: &str, source: &str, le: &str) -> Option<f64> {
    sample(
        text,
        &format!("vmfactory_get_vm_duration_seconds_bucket{{source=\"{source}\",le=\"{le}\"}}"),
    )
}

async fn pool_size_is(m: &Metrics, n: f64) {
    wait_until(Duration::from_secs(5), || async {
        (sample(&m.encode(), "vmfactory_pool_size") == Some(n)).then_some(())
    })
    .await
    .expect("pool size reached");
}

#[test]
fn a_new_registry_exposes_every_family_at_zero() {
    let text = Metrics::new().encode();
    for (name, kind) in [
        ("vmfactory_get_vm_total", "counter"),
        ("vmfactory_get_vm_duration_seconds", "histogram"),
        ("vmfactory_pool_size", "gauge"),
        ("vmfactory_pool_target", "gauge"),
        ("vmfactory_refill_failures_total", "counter"),
        ("vmfactory_template_age_seconds", "gauge"),
        ("vmfactory_vms_alive", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} in:\n{text}"
        );
        assert!(text.contains(&format!("# HELP {name} ")), "{name} help");
    }
    assert_eq!(sample(&text, "vmfactory_refill_failures_total"), Some(0.0));
    assert_eq!(sample(&text, "vmfactory_vms_alive"), Some(0.0));
    for source in GetVmSource::ALL {
        assert_eq!(
            count(&text, source.as_str()),
            Some(0.0),
            "{source} from the start"
        );
    }
}

#[test]
fn histogram_buckets_are_cumulative_per_source() {
    let m = Metrics::new();
    m.record_get_vm(GetVmSource::Cache, Duration::from_micros(100));
    m.record_get_vm(GetVmSource::Cache, Duration::from_millis(5));
    m.record_get_vm(GetVmSource::Template, Duration::from_secs(3));
    let text = m.encode();
    assert_eq!(count(&text, "cache"), Some(2.0));
    assert_eq!(count(&text, "template"), Some(1.0));
    assert_eq!(bucket(&text, "cache", "0.0005"), Some(1.0));
    assert_eq!(bucket(&text, "cache", "0.008"), Some(2.0));
    assert_eq!(bucket(&text, "cache", "+Inf"), Some(2.0));
    assert_eq!(bucket(&text, "template", "2.048"), Some(0.0));
    assert_eq!(bucket(&text, "template", "8.192"), Some(1.0));
    let sum = sample(
        &text,
        "vmfactory_get_vm_duration_seconds_sum{source=\"template\"}",
    )
    .expect("sum");
    assert!((sum - 3.0).abs() < 1e-9, "{sum}");
    assert_eq!(
        sample(
            &text,
            "vmfactory_get_vm_duration_seconds_count{source=\"cache\"}"
        ),
        Some(2.0)
    );
    // Nine bounds and +Inf per source.
    let cache_buckets = samples(&text)
        .iter()
        .filter(|(n, _)| {
            n.starts_with("vmfactory_get_vm_duration_seconds_bucket") && n.contains("\"cache\"")
        })
        .count();
    assert_eq!(cache_buckets, 10);
}

#[tokio::test]
async fn a_cache_counts_hits_misses_its_pool_and_refill_failures() {
    let b = Arc::new(FakeBackends::new());
    let m = Arc::new(Metrics::new());
    let c = CacheFactory::with_metrics(
        2,
        Arc::new(DirectFactory::with_backends(b.config(), b.clone())),
        GetVmSource::Direct,
        m.clone(),
    );
    pool_size_is(&m, 2.0).await;
    let text = m.encode();
    assert_eq!(sample(&text, "vmfactory_pool_target"), Some(2.0));
    assert_eq!(sample(&text, "vmfactory_vms_alive"), Some(2.0));

    // Refills now take 200 ms: two hits empty the pool, the third call is a miss.
    b.set_boot_delay(Duration::from_millis(200));
    let mut vms = Vec::new();
    for _ in 0..3 {
        vms.push(c.get_base_vm(c.config()).await.expect("vm"));
    }
    let text = m.encode();
    assert_eq!(count(&text, "cache"), Some(2.0));
    assert_eq!(count(&text, "direct"), Some(1.0));
    assert_eq!(bucket(&text, "direct", "0.128"), Some(0.0), "a miss boots");
    assert_eq!(bucket(&text, "direct", "+Inf"), Some(1.0));
    pool_size_is(&m, 2.0).await;

    // A failing base: the workers' failures are counted.
    b.set_boot_delay(Duration::ZERO);
    b.fail_hv_at(Some(FakeStep::Start));
    let taken = c.get_base_vm(c.config()).await.expect("a hit");
    wait_until(Duration::from_secs(5), || async {
        (sample(&m.encode(), "vmfactory_refill_failures_total") >= Some(1.0)).then_some(())
    })
    .await
    .expect("refill failure counted");
    assert_eq!(sample(&m.encode(), "vmfactory_pool_size"), Some(1.0));
    b.fail_hv_at(None);

    c.close().await.expect("close");
    let text = m.encode();
    assert_eq!(sample(&text, "vmfactory_pool_size"), Some(0.0));
    assert_eq!(sample(&text, "vmfactory_vms_alive"), Some(0.0));
    for vm in vms.into_iter().chain([taken]) {
        vm.stop().await.expect("stop");
    }
    assert_eq!(b.live().await, 0);
}

#[tokio::test]
async fn a_factory_counts_fallbacks_and_its_uncached_base() {
    let b = Arc::new(FakeBackends::new());
    let mut c = FactoryConfig::new(b.config());
    c.template = true;
    c.template_path = b.template_path();
    c.prestart = 0;
    let m = Arc::new(Metrics::new());
    let f = Factory::new_with(&c, b.clone(), Arc::new(FakeHost::default()))
        .await
        .expect("factory")
        .with_metrics(m.clone());
    assert_eq!(f.kind(), BaseKind::Template);
    let clone = f.get_vm(&b.config()).await.expect("clone");
    let mut other = b.config();
    other.hypervisor.kernel_params = "debug".into();
    let direct = f.get_vm(&other).await.expect("fallback");
    let text = m.encode();
    assert_eq!(count(&text, "template"), Some(1.0));
    assert_eq!(count(&text, "fallback"), Some(1.0));
    assert_eq!(count(&text, "direct"), Some(0.0));
    clone.stop().await.expect("stop");
    direct.stop().await.expect("stop");
    f.close().await.expect("close");
}

/// A base with pre-started clones and nothing else.
#[derive(Debug)]
struct Prestarting(VmConfig);

#[async_trait]
impl FactoryBase for Prestarting {
    fn config(&self) -> &VmConfig {
        &self.0
    }
    async fn get_base_vm(&self, _config: &VmConfig) -> Result<Vm, BaseError> {
        Err(BaseError::Closed { what: "test" })
    }
    fn prestarted(&self) -> Prestarted {
        Prestarted {
            waiting: 3,
            pids: Vec::new(),
        }
    }
    async fn close(&self) -> Result<(), BaseError> {
        Ok(())
    }
}

#[test]
fn template_age_and_prestarted_clones_are_read_at_scrape() {
    let m = Metrics::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    m.set_template_created(now - 100);
    let age = sample(&m.encode(), "vmfactory_template_age_seconds").expect("age");
    assert!((100.0..200.0).contains(&age), "{age}");

    let base: Arc<dyn FactoryBase> = Arc::new(Prestarting(FakeBackends::new().config()));
    m.watch_base(&base);
    m.set_pool_size(2);
    assert_eq!(sample(&m.encode(), "vmfactory_vms_alive"), Some(5.0));
    drop(base);
    assert_eq!(
        sample(&m.encode(), "vmfactory_vms_alive"),
        Some(2.0),
        "a gone base is not held"
    );
}

#[test]
fn addresses_parse_or_say_why_not() {
    assert_eq!(
        "127.0.0.1:9464".parse(),
        Ok(MetricsAddress::Tcp(([127, 0, 0, 1], 9464).into()))
    );
    assert!(matches!(
        "[::1]:0".parse::<MetricsAddress>(),
        Ok(MetricsAddress::Tcp(a)) if a.ip().is_loopback()
    ));
    assert_eq!(
        "unix:/run/vc/metrics.sock".parse(),
        Ok(MetricsAddress::Unix("/run/vc/metrics.sock".into()))
    );
    for bad in [
        "",
        "localhost:9464",
        "127.0.0.1",
        "9464",
        "http://127.0.0.1:9464",
    ] {
        assert_eq!(
            bad.parse::<MetricsAddress>(),
            Err(MetricsAddressError::Invalid(bad.into())),
            "{bad}"
        );
    }
    assert!(matches!(
        "unix:metrics.sock".parse::<MetricsAddress>(),
        Err(MetricsAddressError::Relative(_))
    ));
    let long = format!("unix:/{}", "x".repeat(MAX_SOCKET_PATH));
    assert!(matches!(
        long.parse::<MetricsAddress>(),
        Err(MetricsAddressError::TooLong { .. })
    ));
    assert_eq!(
        MetricsAddress::Unix("/a/b".into()).to_string(),
        "unix:/a/b",
        "displayed as written"
    );
}

/// One raw HTTP/1.0 request on `stream`; the whole response.
async fn request<S>(mut stream: S, line: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("{line} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

async fn scrape(address: &MetricsAddress, line: &str) -> String {
    match address {
        MetricsAddress::Tcp(a) => {
            request(
                tokio::net::TcpStream::connect(a).await.expect("connect"),
                line,
            )
            .await
        }
        MetricsAddress::Unix(p) => {
            request(
                tokio::net::UnixStream::connect(p).await.expect("connect"),
                line,
            )
            .await
        }
    }
}

/// The body of a 200 text response, checked.
fn body(response: &str) -> &str {
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    body
}

#[tokio::test]
async fn the_endpoint_serves_on_a_unix_socket_0600_and_removes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("metrics.sock");
    let address = MetricsAddress::Unix(path.clone());
    let m = Arc::new(Metrics::new());
    m.record_get_vm(GetVmSource::Cache, Duration::from_millis(1));
    let mut server = MetricsServer::start(&address, m.clone())
        .await
        .expect("start");
    assert_eq!(server.address(), &address);
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let text = scrape(&address, "GET /metrics").await;
    assert_eq!(count(body(&text), "cache"), Some(1.0));
    let head = scrape(&address, "HEAD /metrics").await;
    assert_eq!(body(&head), "", "HEAD has no body");
    assert!(scrape(&address, "GET /").await.starts_with("HTTP/1.0 404"));
    let post = scrape(&address, "POST /metrics").await;
    assert!(post.starts_with("HTTP/1.0 405"), "{post}");

    assert!(matches!(
        MetricsServer::start(&address, m.clone()).await,
        Err(MetricsError::InUse { .. })
    ));
    assert!(path.exists(), "a refused second server leaves the socket");

    server.shutdown().await.expect("shutdown");
    server.shutdown().await.expect("idempotent");
    assert!(!path.exists(), "socket removed");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_file_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("metrics.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let address = MetricsAddress::Unix(path.clone());
    let m = Arc::new(Metrics::new());
    let mut server = MetricsServer::start(&address, m.clone())
        .await
        .expect("over a stale socket");
    server.shutdown().await.expect("shutdown");

    std::fs::write(&path, b"x").expect("file");
    assert!(matches!(
        MetricsServer::start(&address, m).await,
        Err(MetricsError::NotASocket(p)) if p == path
    ));
    assert_eq!(std::fs::read(&path).expect("kept"), b"x");
}

#[tokio::test]
async fn the_endpoint_serves_on_tcp_and_a_taken_port_is_in_use() {
    let m = Arc::new(Metrics::new());
    m.record_get_vm(GetVmSource::Template, Duration::from_millis(700));
    let any: MetricsAddress = "127.0.0.1:0".parse().expect("address");
    let mut server = MetricsServer::start(&any, m.clone()).await.expect("start");
    let MetricsAddress::Tcp(bound) = *server.address() else {
        panic!("tcp")
    };
    assert_ne!(bound.port(), 0, "the real port is reported");
    let text = scrape(server.address(), "GET /metrics").await;
    let text = body(&text);
    assert_eq!(count(text, "template"), Some(1.0));
    assert_eq!(bucket(text, "template", "0.512"), Some(0.0));
    assert_eq!(bucket(text, "template", "2.048"), Some(1.0));

    let err = MetricsServer::start(server.address(), m.clone())
        .await
        .expect_err("port taken");
    assert!(matches!(err, MetricsError::InUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("Metrics address {bound} is in use")
    );
    server.shutdown().await.expect("shutdown");
    assert!(
        tokio::net::TcpStream::connect(bound).await.is_err(),
        "closed"
    );
}

#[test]
fn sample_matches_a_whole_name_with_its_labels() {
    let text = "a_total{x=\"1\"} 2\na_total 3\n";
    assert_eq!(sample(text, "a_total"), Some(3.0));
    assert_eq!(sample(text, "a_total{x=\"1\"}"), Some(2.0));
}
