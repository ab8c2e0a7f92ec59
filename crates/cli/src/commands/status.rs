//! `vmfactory status`: the template, the VM-cache server and its VMs, and what killed
//! commands left (orphaned VMs, a stale template tmpfs), with a verdict fit for a health
//! probe: exit 0 when the factory serves as configured, 1 when it is degraded (a template
//! configured but absent, or one `get_vm` would refuse for this config; a VM-cache server
//! configured but not answering). Template metadata that is corrupt, truncated, of another
//! version, oversized, a symlink or not a regular file is reported and exits 2.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use vmfactory_factory::{
    error_chain, CacheClient, TemplateError, TemplateFactory, TemplateMetadata,
};
use vmfactory_vm::VmInfo;

use super::inspect::is_bad_metadata;
use super::leftovers::{self, FailedVmLogs, LeftoversReport};
use crate::config_file::Settings;
use crate::failure::{CmdResult, Failure};
use crate::probe::exists;

/// What `status --json` prints.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// The configuration it was read with.
    pub config: String,
    /// `on` when a template is present or a VM-cache server answers.
    pub factory: &'static str,
    /// `ok`, or `degraded` when what is configured is not what serves (see `problems`).
    pub health: &'static str,
    /// Why it is degraded, one line each.
    pub problems: Vec<String>,
    /// The template.
    pub template: TemplateReport,
    /// The VM-cache server.
    pub cache_server: ServerReport,
    /// What killed commands left.
    pub leftovers: LeftoversReport,
    /// VMs that failed to come up, whose logs are kept until `vmfactory destroy`.
    pub failed_vms: Vec<FailedVmLogs>,
}

/// The template part of [`StatusReport`].
#[derive(Debug, Serialize)]
pub struct TemplateReport {
    /// `[factory] enable_template`.
    pub enabled: bool,
    /// `[factory] template_path`.
    pub path: PathBuf,
    /// Whether a template (its metadata) is there.
    pub present: bool,
    /// Its metadata, when it loads.
    pub metadata: Option<TemplateMetadata>,
    /// Why the metadata does not load (corrupt, another version, ...).
    pub error: Option<String>,
    /// Why `get_vm` would refuse the template for this configuration (another kernel,
    /// QEMU, size, or its files changed since it was saved); `None` when it would serve.
    pub stale: Option<String>,
    /// The load error when it says the metadata file itself is bad: `status` then exits 2.
    #[serde(skip)]
    pub bad_metadata: Option<TemplateError>,
}

/// The server part of [`StatusReport`].
#[derive(Debug, Serialize)]
pub struct ServerReport {
    /// `[factory] vm_cache_number`.
    pub vm_cache_number: u32,
    /// `[factory] vm_cache_endpoint`.
    pub endpoint: PathBuf,
    /// Whether a server answers there.
    pub running: bool,
    /// Its pid.
    pub pid: Option<u32>,
    /// The VMs it holds ready.
    pub vms: Vec<VmInfo>,
    /// Why it cannot be asked (stale socket, ...), when the socket exists.
    pub error: Option<String>,
}

pub async fn run(s: &Settings, json: bool) -> CmdResult {
    let report = gather(s).await;
    if json {
        let text = serde_json::to_string_pretty(&report).context("Cannot encode the status")?;
        println!("{text}");
    } else {
        print!("{}", table(&report));
    }
    // Bad stored input is a usage error, as for `inspect template`; the report above still
    // shows everything else.
    if let Some(e) = report.template.bad_metadata {
        return Err(Failure::usage(e));
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("Degraded: {}", report.problems.join("; ")).into())
    }
}

async fn gather(s: &Settings) -> StatusReport {
    let template = template_report(s, s.template, &s.template_path).await;
    let cache_server = server_report(s.cache_number, &s.endpoint).await;
    let leftovers = leftovers::find(s, cache_server.running).await;
    let on = template.present || cache_server.running;
    let problems = problems(&template, &cache_server);
    // Unreadable: shown as none; `logs` and `destroy` say why if asked.
    let failed_vms = leftovers::failed_vms(s).await.unwrap_or_default();
    StatusReport {
        config: s.origin.clone(),
        factory: if on { "on" } else { "off" },
        health: if problems.is_empty() {
            "ok"
        } else {
            "degraded"
        },
        problems,
        template,
        cache_server,
        leftovers,
        failed_vms,
    }
}

/// What keeps the factory from serving as configured. Leftovers are shown but not counted:
/// a VM being handed over looks unowned for an instant, and a probe must not flap on it.
fn problems(t: &TemplateReport, c: &ServerReport) -> Vec<String> {
    let mut out = Vec::new();
    if t.enabled {
        match (&t.metadata, &t.error, &t.stale) {
            (_, Some(e), _) => out.push(format!("template unusable: {e}")),
            (Some(_), None, Some(why)) => out.push(format!(
                "template stale for this config ({why}); `vmfactory destroy` then `vmfactory init` remakes it"
            )),
            (None, None, _) => out.push(format!(
                "no template at {} (`vmfactory init` makes it); VMs boot cold",
                t.path.display()
            )),
            (Some(_), None, None) => {}
        }
    }
    if c.vm_cache_number > 0 && !c.running {
        let why = c.error.as_deref().unwrap_or("not running");
        out.push(format!(
            "VM-cache server at {}: {why}",
            c.endpoint.display()
        ));
    }
    out
}

async fn template_report(s: &Settings, enabled: bool, path: &Path) -> TemplateReport {
    let (present, metadata, error, bad_metadata) = match TemplateMetadata::load(path).await {
        Ok(m) => (true, Some(m), None, None),
        Err(TemplateError::Missing { .. }) => (false, None, None, None),
        Err(e) => {
            let error = Some(error_chain(&e));
            (true, None, error, is_bad_metadata(&e).then_some(e))
        }
    };
    // The same check `get_vm` makes, only when there is a loadable template to check.
    let stale = match &metadata {
        Some(_) => TemplateFactory::verify(&s.vm, path)
            .await
            .err()
            .map(|e| error_chain(&e)),
        None => None,
    };
    TemplateReport {
        enabled,
        path: path.to_owned(),
        present,
        metadata,
        error,
        stale,
        bad_metadata,
    }
}

async fn server_report(n: u32, endpoint: &Path) -> ServerReport {
    let mut r = ServerReport {
        vm_cache_number: n,
        endpoint: endpoint.to_owned(),
        running: false,
        pid: None,
        vms: Vec::new(),
        error: None,
    };
    if !exists(endpoint).await {
        return r;
    }
    let status = match CacheClient::connect(endpoint).await {
        Ok(client) => client.server_status().await,
        Err(e) => Err(e),
    };
    match status {
        Ok(st) => {
            r.running = true;
            r.pid = Some(st.pid);
            r.vms = st.vms;
        }
        Err(e) => r.error = Some(error_chain(&e)),
    }
    r
}

fn table(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "factory:       {} (config: {})", r.factory, r.config);
    let _ = writeln!(out, "health:        {}", r.health);
    for p in &r.problems {
        let _ = writeln!(out, "  - {p}");
    }
    let t = &r.template;
    let state = match (&t.metadata, &t.error) {
        (Some(m), _) => format!(
            "present, {} MiB, {} vCPU (max {}), {}{}, made {} ago, hash {}, {}",
            m.memory_mib,
            m.key.vcpus,
            m.key.max_vcpus,
            m.key.accel,
            m.key
                .cpu_model
                .as_ref()
                .map(|c| format!(" -cpu {c}"))
                .unwrap_or_default(),
            age(m.created_at_secs),
            m.config_hash.get(..12).unwrap_or(&m.config_hash),
            m.key.qemu_version,
        ),
        (None, Some(e)) => format!("unusable: {e}"),
        (None, None) => "absent".to_owned(),
    };
    let state = match &t.stale {
        Some(why) => format!("{state}; STALE: {why}"),
        None => state,
    };
    let enabled = if t.enabled {
        ""
    } else {
        " [enable_template = false]"
    };
    let _ = writeln!(out, "template:      {}: {state}{enabled}", t.path.display());
    let c = &r.cache_server;
    let state = match (c.pid, &c.error) {
        (Some(pid), _) => format!("running, pid {pid}, {} VMs ready", c.vms.len()),
        (None, Some(e)) => format!("not answering: {e}"),
        (None, None) => "not running".to_owned(),
    };
    let _ = writeln!(
        out,
        "cache server:  {}: {state} [vm_cache_number = {}]",
        c.endpoint.display(),
        c.vm_cache_number
    );
    if !c.vms.is_empty() {
        let _ = writeln!(
            out,
            "  {:<36}  {:>8}  {:>5}  {:>10}  STATE",
            "ID", "PID", "VCPUS", "MEMORY"
        );
        for vm in &c.vms {
            let pid = vm.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
            let state = serde_json::to_value(&vm.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", vm.state));
            let _ = writeln!(
                out,
                "  {:<36}  {pid:>8}  {:>5}  {:>6} MiB  {state}",
                vm.id, vm.vcpus, vm.memory_mib
            );
        }
    }
    out.push_str(&leftovers::table(&r.leftovers));
    if !r.failed_vms.is_empty() {
        let _ = writeln!(
            out,
            "failed VMs:    {} kept for a post-mortem (`vmfactory logs ID`; `destroy` removes them)",
            r.failed_vms.len()
        );
        for f in &r.failed_vms {
            let _ = writeln!(out, "  {:<36}  {}", f.id, f.console_log.display());
        }
    }
    out
}

/// `1h 2m`, `3m 4s` or `5s` since `secs` (Unix time).
fn age(secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(secs);
    span(now.saturating_sub(secs))
}

/// `1h 2m`, `3m 4s` or `5s`: a duration of `d` seconds.
pub fn span(d: u64) -> String {
    match (d / 3600, (d % 3600) / 60, d % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert_eq!(age(now), "0s");
        assert_eq!(age(now - 65), "1m 5s");
        assert_eq!(age(now - 7300), "2h 1m");
    }
}
