//! QMP-level operations on a running QEMU: template save and load (migration with
//! `x-ignore-shared`) and CPU / memory hotplug.

use std::collections::BTreeSet;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;

use qapi::qmp::{
    device_add, device_del, migrate, migrate_incoming, migrate_set_capabilities, object_add,
    object_del, query_cpus_fast, query_hotpluggable_cpus, query_memory_devices, stop,
    MemoryBackendFileProperties, MemoryBackendMemfdProperties, MemoryBackendProperties,
    MemoryDeviceInfo, MigrationCapability, MigrationCapabilityStatus, ObjectOptions,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::{info, instrument, warn};

use super::{Inner, Running, MIGRATION_TIMEOUT};
use crate::cmdline::{load_uri, save_uri, BackendKind};
use crate::config::VmSize;
use crate::config::{TemplatePaths, TemplateRole};
use crate::error::{Error, Result};
use crate::files::{open_regular, Symlinks};
use crate::qmp::QmpClient;

const MIB: u64 = 1024 * 1024;

/// The slots of the plugged DIMMs and their total size in bytes (`query-memory-devices`).
async fn plugged_dimms(id: &str, qmp: &QmpClient) -> Result<(BTreeSet<i64>, u64)> {
    let devices = qmp
        .execute(query_memory_devices {})
        .await
        .map_err(|e| Error::qmp(id, e))?;
    let mut used = BTreeSet::new();
    let mut plugged: u64 = 0;
    for d in &devices {
        if let MemoryDeviceInfo::dimm(w) | MemoryDeviceInfo::nvdimm(w) = d {
            used.insert(w.data.slot);
            plugged += u64::try_from(w.data.size).unwrap_or(0);
        }
    }
    Ok((used, plugged))
}

/// The size QEMU reports: vCPUs from `query-cpus-fast`, memory = boot memory + plugged DIMMs.
pub(super) async fn size(inner: &Inner, r: &Running) -> Result<VmSize> {
    let id = &inner.id;
    let cpus = r
        .qmp
        .execute(query_cpus_fast {})
        .await
        .map_err(|e| Error::qmp(id, e))?;
    let (_, plugged) = plugged_dimms(id, &r.qmp).await?;
    Ok(VmSize {
        vcpus: u32::try_from(cpus.len()).unwrap_or(u32::MAX),
        memory_mib: inner.config.memory_mib + plugged / MIB,
    })
}

/// Turns on `x-ignore-shared` (RAM in a shared file is not copied into the migration stream)
/// and `events` (QEMU sends `MIGRATION` events only with it, and [`wait_migration`] waits on
/// them).
async fn set_ignore_shared(id: &str, qmp: &QmpClient) -> Result<()> {
    qmp.execute(migrate_set_capabilities {
        capabilities: vec![
            MigrationCapabilityStatus {
                capability: MigrationCapability::x_ignore_shared,
                state: true,
            },
            MigrationCapabilityStatus {
                capability: MigrationCapability::events,
                state: true,
            },
        ],
    })
    .await
    .map_err(|e| Error::qmp(id, e))?;
    Ok(())
}

/// Waits until the migration is `completed` (or `failed` / `cancelled`, or the timeout).
///
/// Event-driven: `events` must have been subscribed before the migration was started. Each
/// `MIGRATION` event (and a lagging receiver) triggers one `query-migrate`, whose answer is
/// authoritative, so an event missed or arriving before the first look costs nothing.
///
/// Reads the reply as raw JSON: qapi 0.15's `MigrationInfo` follows QEMU 9.1, whose `ram`
/// statistics need not match what 7.2 sends; only `status` and `error-desc` matter here.
async fn wait_migration(
    id: &str,
    qmp: &QmpClient,
    mut events: broadcast::Receiver<Value>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp
            .execute_raw("query-migrate", Value::Null)
            .await
            .map_err(|e| Error::qmp(id, e))?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                return Err(Error::Migration {
                    id: id.to_owned(),
                    status: status.to_owned(),
                    desc: info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no description")
                        .to_owned(),
                })
            }
            _ => {}
        }
        let next = async {
            loop {
                match events.recv().await {
                    Ok(ev) if ev.get("event").and_then(Value::as_str) == Some("MIGRATION") => {
                        return;
                    }
                    Ok(_) => {}
                    // Lagged: look again. Closed: the next query fails with the QMP error.
                    Err(_) => return,
                }
            }
        };
        if tokio::time::timeout_at(deadline, next).await.is_err() {
            return Err(Error::MigrationTimeout {
                id: id.to_owned(),
                timeout: MIGRATION_TIMEOUT,
            });
        }
    }
}

/// Opens a clone's device state file `state` for [`incoming`]; QEMU inherits the descriptor.
/// A symlink, FIFO or device there is refused at once (see [`crate::files`]); the descriptor is
/// checked, so what QEMU reads is what was checked.
pub(super) async fn open_state(state: &Path) -> Result<OwnedFd> {
    let path = state.to_owned();
    let opened = tokio::task::spawn_blocking(move || open_regular(&path, Symlinks::Refuse, false))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    let file = opened.map_err(|source| Error::Io {
        op: "Reading template state",
        path: state.to_owned(),
        source,
    })?;
    Ok(file.into())
}

/// Readies a clone's QEMU for [`incoming`]: the capabilities must be set before the load.
pub(super) async fn prepare_incoming(id: &str, qmp: &QmpClient) -> Result<()> {
    set_ignore_shared(id, qmp).await
}

/// Loads a clone's device state (`migrate-incoming fd:N`, `state` being the number of the
/// descriptor from [`open_state`] that QEMU inherited) after [`prepare_incoming`]; the VM
/// stays paused.
#[instrument(skip(qmp))]
pub(super) async fn incoming(id: &str, qmp: &QmpClient, state: RawFd) -> Result<()> {
    let events = qmp.subscribe();
    qmp.execute(migrate_incoming {
        uri: Some(load_uri(state)),
        channels: None,
        exit_on_error: None,
    })
    .await
    .map_err(|e| Error::qmp(id, e))?;
    wait_migration(id, qmp, events).await?;
    info!("template state loaded");
    Ok(())
}

/// `stop`, `x-ignore-shared`, `migrate` to STATE ([`save_uri`]), wait for `completed`.
#[instrument(skip_all, fields(vm = %inner.id))]
pub(super) async fn save_template(inner: &Inner, r: &mut Running) -> Result<()> {
    let id = &inner.id;
    let cfg = &inner.config;
    let Some(TemplateRole::SaveTo(TemplatePaths { state, .. })) = &cfg.template else {
        return Err(Error::Unsupported {
            id: id.clone(),
            what: "Saving a template (the VM has no save-to template role)",
        });
    };
    if !r.disks.is_empty() {
        // Its clones would boot without them and fail to load the device state.
        return Err(Error::Unsupported {
            id: id.clone(),
            what: "Saving a template with hot-plugged disks",
        });
    }
    r.qmp
        .execute(stop {})
        .await
        .map_err(|e| Error::qmp(id, e))?;
    set_ignore_shared(id, &r.qmp).await?;
    let events = r.qmp.subscribe();
    let t0 = std::time::Instant::now();
    r.qmp
        .execute(migrate {
            uri: Some(save_uri(state, r.qmp.qemu_version())),
            channels: None,
            detach: None,
            resume: None,
        })
        .await
        .map_err(|e| Error::qmp(id, e))?;
    wait_migration(id, &r.qmp, events).await?;
    info!(state = %state.display(), ms = t0.elapsed().as_millis(), "template saved");
    Ok(())
}

/// The topology key a CPU slot is filled in order of.
fn slot_key(p: &qapi::qmp::CpuInstanceProperties) -> [i64; 5] {
    [p.socket_id, p.die_id, p.cluster_id, p.core_id, p.thread_id].map(|v| v.unwrap_or(0))
}

/// Plugs up to `n` vCPUs into free slots, rolling back this call's CPUs on a failure.
#[instrument(skip(inner, r), fields(vm = %inner.id))]
pub(super) async fn add_vcpus(inner: &Inner, r: &mut Running, n: u32) -> Result<u32> {
    let id = &inner.id;
    if n == 0 {
        return Ok(0);
    }
    if !inner.config.machine.supports_hotplug() {
        return Err(Error::Unsupported {
            id: id.clone(),
            what: "CPU hotplug",
        });
    }
    let slots = r
        .qmp
        .execute(query_hotpluggable_cpus {})
        .await
        .map_err(|e| Error::qmp(id, e))?;
    let mut free: Vec<_> = slots.into_iter().filter(|c| c.qom_path.is_none()).collect();
    free.sort_by_key(|c| slot_key(&c.props));
    let mut added: Vec<String> = Vec::new();
    for cpu in free.into_iter().take(n as usize) {
        let dev_id = format!("cpu-{}", r.next_cpu_id);
        r.next_cpu_id += 1;
        // Pass every property QEMU reported for the slot (socket/die/core/thread/node ids).
        let props = match serde_json::to_value(&cpu.props) {
            Ok(Value::Object(map)) => map,
            _ => Default::default(),
        };
        let cmd = device_add {
            driver: cpu.type_.clone(),
            id: Some(dev_id.clone()),
            bus: None,
            arguments: props,
        };
        if let Err(e) = r.qmp.execute(cmd).await {
            warn!(error = %e, device = %dev_id, "cpu hotplug failed, rolling back");
            for done in added.iter().rev() {
                if let Err(e) = r.qmp.execute(device_del { id: done.clone() }).await {
                    warn!(error = %e, device = %done, "rollback device_del failed");
                } else {
                    r.vcpus -= 1;
                }
            }
            return Err(Error::qmp(id, e));
        }
        r.vcpus += 1;
        added.push(dev_id);
    }
    let count = u32::try_from(added.len()).unwrap_or(u32::MAX);
    info!(requested = n, added = count, vcpus = r.vcpus, "vcpus added");
    Ok(count)
}

/// The `object-add` arguments for a hot-added backend of the boot memory's kind.
fn backend_object(
    kind: BackendKind,
    mem_id: String,
    bytes: u64,
    dir: &std::path::Path,
) -> object_add {
    let base = |share: Option<bool>| MemoryBackendProperties {
        dump: None,
        host_nodes: None,
        merge: None,
        policy: None,
        prealloc: None,
        prealloc_context: None,
        prealloc_threads: None,
        reserve: None,
        share,
        x_use_canonical_path_for_ramblock_id: None,
        size: bytes,
    };
    let opts = match kind {
        BackendKind::Ram => ObjectOptions::memory_backend_ram {
            id: mem_id,
            memory_backend_ram: base(None),
        },
        BackendKind::Memfd => ObjectOptions::memory_backend_memfd {
            id: mem_id,
            memory_backend_memfd: MemoryBackendMemfdProperties {
                base: base(Some(true)),
                hugetlb: None,
                hugetlbsize: None,
                seal: None,
            },
        },
        // A directory as mem-path makes QEMU create an unlinked temporary file in it, so the
        // DIMM is file-backed like boot memory but leaves nothing behind and never touches the
        // template's memory file.
        BackendKind::File { share } => ObjectOptions::memory_backend_file {
            id: mem_id,
            memory_backend_file: MemoryBackendFileProperties {
                base: base(Some(share)),
                align: None,
                discard_data: None,
                offset: None,
                pmem: None,
                readonly: None,
                rom: None,
                mem_path: dir.to_string_lossy().into_owned(),
            },
        },
    };
    object_add(opts)
}

/// Plugs one DIMM of `mib` MiB into the first free slot.
#[instrument(skip(inner, r), fields(vm = %inner.id))]
pub(super) async fn add_memory(inner: &Inner, r: &mut Running, mib: u64) -> Result<u64> {
    let id = &inner.id;
    let cfg = &inner.config;
    if mib == 0 {
        return Ok(0);
    }
    if !cfg.machine.supports_hotplug() || cfg.memory_slots == 0 {
        return Err(Error::Unsupported {
            id: id.clone(),
            what: "Memory hotplug (no memory slots)",
        });
    }
    let (used, plugged) = plugged_dimms(id, &r.qmp).await?;
    let current = cfg.memory_mib + plugged / MIB;
    if current + mib > cfg.max_memory_mib {
        return Err(Error::MemoryLimit {
            id: id.clone(),
            requested_mib: mib,
            current_mib: current,
            max_mib: cfg.max_memory_mib,
        });
    }
    let slot = (0..i64::from(cfg.memory_slots))
        .find(|s| !used.contains(s))
        .ok_or_else(|| Error::NoFreeMemorySlot { id: id.clone() })?;
    let n = r.next_mem_id;
    r.next_mem_id += 1;
    let (mem_id, dimm_id) = (format!("mem{n}"), format!("dimm{n}"));
    let kind = BackendKind::for_config(cfg);
    r.qmp
        .execute(backend_object(
            kind,
            mem_id.clone(),
            mib * MIB,
            &inner.paths.dir,
        ))
        .await
        .map_err(|e| Error::qmp(id, e))?;
    let dimm = device_add::new(
        "pc-dimm",
        dimm_id.clone(),
        None,
        [
            ("memdev".to_owned(), json!(mem_id)),
            ("slot".to_owned(), json!(slot)),
        ],
    );
    // Subscribed before the plug: the guest's answer may come before `device_add` returns.
    let events = r.qmp.subscribe();
    if let Err(e) = r.qmp.execute(dimm).await {
        warn!(error = %e, device = %dimm_id, "memory hotplug failed, rolling back");
        if let Err(de) = r.qmp.execute(object_del { id: mem_id.clone() }).await {
            warn!(error = %de, object = %mem_id, "rollback object-del failed");
        }
        return Err(Error::qmp(id, e));
    }
    r.memory_mib = current + mib;
    info!(mib, slot, memory_mib = r.memory_mib, "memory added");
    wait_guest_took(&r.qmp, &dimm_id, events).await;
    Ok(mib)
}

/// How long a running guest may take to take a hot-plugged DIMM.
const DIMM_OST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until a running guest has taken the DIMM `dimm`: its ACPI handler adds the memory
/// blocks, then reports with `_OST`, which QEMU turns into `ACPI_DEVICE_OST`. Without this, an
/// `OnlineCPUMem` right after the plug could run before the blocks exist and online nothing
/// (seen under load). A paused guest (or one that never answers) is not waited for: bounded,
/// and only logged, as the memory is plugged either way.
async fn wait_guest_took(qmp: &QmpClient, dimm: &str, mut events: broadcast::Receiver<Value>) {
    let running = qmp
        .execute(qapi::qmp::query_status {})
        .await
        .map(|s| s.running)
        .unwrap_or(false);
    if !running {
        return;
    }
    let took = async {
        loop {
            match events.recv().await {
                Ok(ev) if is_ost_of(&ev, dimm) => return true,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    };
    match tokio::time::timeout(DIMM_OST_TIMEOUT, took).await {
        Ok(true) => tracing::debug!(dimm, "guest took the DIMM"),
        Ok(false) => {}
        Err(_) => warn!(dimm, timeout = ?DIMM_OST_TIMEOUT, "guest did not report taking the DIMM"),
    }
}

/// Whether `event` is the guest's `_OST` report on device `dev`.
fn is_ost_of(event: &Value, dev: &str) -> bool {
    event.get("event").and_then(Value::as_str) == Some("ACPI_DEVICE_OST")
        && event["data"]["info"]["device"].as_str() == Some(dev)
}

#[cfg(test)]
mod tests {
    use super::super::fake_qmp::{fake_vm, names};
    use super::*;
    use crate::config::HypervisorConfig;

    #[test]
    fn a_dimm_is_taken_on_its_own_ost_event() {
        let ost = |dev: &str| {
            json!({"event": "ACPI_DEVICE_OST", "data": {"info": {
                "device": dev, "slot": "1", "slot-type": "DIMM", "source": 1, "status": 0}}})
        };
        assert!(is_ost_of(&ost("dimm1"), "dimm1"));
        assert!(!is_ost_of(&ost("dimm2"), "dimm1"));
        assert!(!is_ost_of(
            &json!({"event": "DEVICE_DELETED", "data": {"device": "dimm1"}}),
            "dimm1"
        ));
    }

    #[test]
    fn backend_objects_match_boot_memory() {
        let ram = serde_json::to_value(backend_object(
            BackendKind::Ram,
            "mem1".into(),
            MIB,
            Path::new("/r"),
        ))
        .expect("ser");
        assert_eq!(
            ram,
            json!({"qom-type": "memory-backend-ram", "id": "mem1", "size": MIB})
        );
        let memfd = serde_json::to_value(backend_object(
            BackendKind::Memfd,
            "mem2".into(),
            MIB,
            Path::new("/r"),
        ))
        .expect("ser");
        assert_eq!(
            memfd,
            json!({"qom-type": "memory-backend-memfd", "id": "mem2", "size": MIB, "share": true})
        );
        let file = serde_json::to_value(backend_object(
            BackendKind::File { share: false },
            "mem3".into(),
            MIB,
            Path::new("/r,x"),
        ))
        .expect("ser");
        assert_eq!(
            file,
            json!({"qom-type": "memory-backend-file", "id": "mem3", "size": MIB,
                   "share": false, "mem-path": "/r,x"})
        );
    }

    #[test]
    fn cpu_slots_sort_by_topology() {
        let p = |s, c| qapi::qmp::CpuInstanceProperties {
            book_id: None,
            cluster_id: None,
            core_id: Some(c),
            die_id: None,
            drawer_id: None,
            module_id: None,
            node_id: None,
            socket_id: Some(s),
            thread_id: Some(0),
        };
        let mut v = [p(3, 0), p(1, 1), p(1, 0), p(2, 0)];
        v.sort_by_key(slot_key);
        let order: Vec<_> = v.iter().map(|p| (p.socket_id, p.core_id)).collect();
        assert_eq!(
            order,
            [
                (Some(1), Some(0)),
                (Some(1), Some(1)),
                (Some(2), Some(0)),
                (Some(3), Some(0))
            ]
        );
    }

    fn hotplug_cfg() -> HypervisorConfig {
        let mut c = HypervisorConfig::new("/k", None);
        c.max_vcpus = 4;
        c.memory_slots = 2;
        c.max_memory_mib = 1024;
        c
    }

    #[tokio::test]
    async fn vcpu_hotplug_skips_taken_slots_and_rolls_back() {
        let (_d, inner, mut r, log) = fake_vm(hotplug_cfg(), |cmd| {
            let slot = |s: i64| {
                json!({"type": "qemu64-x86_64-cpu", "vcpus-count": 1,
                "props": {"socket-id": s, "core-id": 0, "thread-id": 0}})
            };
            match cmd["execute"].as_str() {
                Some("query-hotpluggable-cpus") => {
                    let mut taken = slot(0);
                    taken["qom-path"] = json!("/machine/unattached/device[0]");
                    json!({"return": [slot(3), slot(2), slot(1), taken]})
                }
                Some("device_add") if cmd["arguments"]["socket-id"] == 2 => {
                    json!({"error": {"class": "GenericError", "desc": "boom"}})
                }
                _ => json!({"return": {}}),
            }
        })
        .await;
        let err = add_vcpus(&inner, &mut r, 3)
            .await
            .expect_err("second plug fails");
        assert!(matches!(err, Error::Qmp { .. }), "{err:?}");
        assert_eq!(r.vcpus, 1, "rolled back");
        let log = log.lock().expect("log").clone();
        let adds: Vec<&Value> = log
            .iter()
            .filter(|c| c["execute"] == "device_add")
            .collect();
        assert_eq!(
            adds[0]["arguments"]["socket-id"], 1,
            "lowest free slot first"
        );
        assert_eq!(adds[0]["arguments"]["id"], "cpu-1");
        assert_eq!(adds[0]["arguments"]["driver"], "qemu64-x86_64-cpu");
        let del = log
            .iter()
            .find(|c| c["execute"] == "device_del")
            .expect("rollback");
        assert_eq!(del["arguments"]["id"], "cpu-1");
        r.qemu
            .terminate("t", std::time::Duration::ZERO)
            .await
            .expect("kill");
    }

    #[tokio::test]
    async fn vcpu_hotplug_adds_what_is_free() {
        let (_d, inner, mut r, _log) =
            fake_vm(hotplug_cfg(), |cmd| match cmd["execute"].as_str() {
                Some("query-hotpluggable-cpus") => json!({"return": [
                    {"type": "t", "vcpus-count": 1, "props": {"socket-id": 1}}]}),
                _ => json!({"return": {}}),
            })
            .await;
        assert_eq!(add_vcpus(&inner, &mut r, 3).await.expect("add"), 1);
        assert_eq!((r.vcpus, r.next_cpu_id), (2, 2));
        r.qemu
            .terminate("t", std::time::Duration::ZERO)
            .await
            .expect("kill");
    }

    #[tokio::test]
    async fn memory_hotplug_uses_first_free_slot_and_rolls_back() {
        let (_d, inner, mut r, log) = fake_vm(hotplug_cfg(), |cmd| match cmd["execute"].as_str() {
            Some("query-memory-devices") => json!({"return": [{"type": "dimm", "data": {
                    "id": "dimm9", "addr": 0, "size": 134217728, "slot": 0, "node": 0,
                    "memdev": "/objects/mem9", "hotplugged": true, "hotpluggable": true}}]}),
            Some("device_add") => json!({"error": {"class": "GenericError", "desc": "no"}}),
            _ => json!({"return": {}}),
        })
        .await;
        assert!(add_memory(&inner, &mut r, 128).await.is_err());
        assert_eq!(
            names(&log),
            [
                "qmp_capabilities",
                "query-memory-devices",
                "object-add",
                "device_add",
                "object-del"
            ]
        );
        let log = log.lock().expect("log").clone();
        assert_eq!(log[2]["arguments"]["qom-type"], "memory-backend-ram");
        assert_eq!(log[3]["arguments"]["slot"], 1);
        assert_eq!(log[3]["arguments"]["memdev"], "mem1");
        assert_eq!(log[4]["arguments"]["id"], "mem1");
        // 256 boot + 128 plugged + 1024 requested is over the limit.
        let err = add_memory(&inner, &mut r, 1024).await.expect_err("limit");
        assert!(
            matches!(
                err,
                Error::MemoryLimit {
                    current_mib: 384,
                    ..
                }
            ),
            "{err:?}"
        );
        r.qemu
            .terminate("t", std::time::Duration::ZERO)
            .await
            .expect("kill");
    }

    #[tokio::test]
    async fn a_command_qemu_dies_under_ends_with_its_exit() {
        // `query-cpus-fast` gets no reply (an event instead): only QEMU's death can end it.
        let (_d, inner, mut r, _log) =
            fake_vm(hotplug_cfg(), |cmd| match cmd["execute"].as_str() {
                Some("query-cpus-fast") => json!({"event": "NO_REPLY"}),
                _ => json!({"return": {}}),
            })
            .await;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(r.qemu.pid).expect("pid"));
        let exit = r.exit("t");
        let t0 = std::time::Instant::now();
        let (res, killed) = tokio::join!(exit.guard(size(&inner, &r)), async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
        });
        killed.expect("kill");
        let err = res.expect_err("QEMU died");
        assert!(
            matches!(&err, Error::Exited { what: "QEMU", status: Some(s), .. }
                if std::os::unix::process::ExitStatusExt::signal(s) == Some(9)),
            "{err:?}"
        );
        // Well before the command's own 2 s timeout.
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t0.elapsed()
        );
        r.qemu
            .terminate("t", std::time::Duration::ZERO)
            .await
            .expect("reaped");
    }
}
