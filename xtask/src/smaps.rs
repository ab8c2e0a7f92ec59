//! Where a QEMU process's memory goes: the PSS of each mapping in `/proc/PID/smaps`, summed by
//! what the mapping holds. PSS splits a shared page among the processes mapping it, so the
//! parts of a clone that many processes share (QEMU's text, the template's pages) count 1/N.
//!
//! What each mapping is, in this order (QEMU 7.2 on Linux x86-64, glibc):
//! - guest RAM: QEMU's RAM blocks are `MADV_DONTFORK` (`dc` in `VmFlags`); the one at least as
//!   large as the guest's memory is its RAM (the template's memory file for a clone, an
//!   anonymous or memfd mapping for a direct VM). Its private pages (a clone's copy-on-write
//!   copies) are counted apart.
//! - TCG translation buffer: anonymous and executable (`rwxp`), or QEMU's `tcg-jit` memfd when
//!   it splits writing and executing.
//! - other RAM blocks (`dc`, smaller than the guest): ROMs, BIOS, ACPI tables.
//! - the QEMU binary and other files (shared libraries, locale data); their private pages
//!   (relocated pointers, `.data`, `.bss`) are every process's own.
//! - `[heap]`: glibc's main arena. Other arenas: anonymous mappings on a 64 MiB boundary
//!   (glibc's `HEAP_MAX_SIZE`) followed by their unused, inaccessible reserve.
//! - stacks: `[stack]` and any mapping holding a thread's stack pointer.
//! - other: the remaining anonymous memory (large `malloc`s, which glibc maps on their own,
//!   QEMU's TB hash table, …) and the kernel's `[vdso]`/`[vvar]`.

use anyhow::{Context, Result};
use serde::Serialize;

/// One mapping of `/proc/PID/smaps`, with the fields the breakdown uses (KiB).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// Path, `[heap]`, `[stack]`, … or empty for anonymous memory.
    pub name: String,
    pub pss: u64,
    pub private: u64,
    pub anon_huge: u64,
    /// `VmFlags` (two-letter codes).
    pub flags: Vec<String>,
}

impl Mapping {
    fn size_kib(&self) -> u64 {
        (self.end - self.start) / 1024
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn anonymous(&self) -> bool {
        self.name.is_empty()
    }
}

/// Parses `/proc/PID/smaps`. Lines it does not know are skipped; a field line before any
/// mapping header is an error.
pub fn parse(text: &str) -> Result<Vec<Mapping>> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = header(line) {
            out.push(m);
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Some(cur) = out.last_mut() else {
            anyhow::bail!("smaps field before any mapping: {line:?}");
        };
        let kib = || {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        };
        match key {
            "Pss" => cur.pss = kib().context("Bad Pss line")?,
            "Private_Clean" | "Private_Dirty" => {
                cur.private += kib().context("Bad Private line")?;
            }
            "AnonHugePages" => cur.anon_huge = kib().context("Bad AnonHugePages line")?,
            "VmFlags" => cur.flags = value.split_whitespace().map(str::to_owned).collect(),
            _ => {}
        }
    }
    Ok(out)
}

/// `start-end perms offset dev inode [name]`, or `None` for a field line.
fn header(line: &str) -> Option<Mapping> {
    let mut parts = line.splitn(6, ' ');
    let (start, end) = parts.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = parts.next()?;
    if perms.len() != 4 {
        return None;
    }
    // offset, device, inode
    for _ in 0..3 {
        parts.next()?;
    }
    Some(Mapping {
        start,
        end,
        perms: perms.to_owned(),
        name: parts.next().unwrap_or("").trim().to_owned(),
        ..Mapping::default()
    })
}

/// The stack pointers of `pid`'s threads blocked in the kernel (`/proc/PID/task/*/syscall`:
/// `nr args… sp pc`; a running thread shows `running` and is skipped).
fn stack_pointers(pid: u32) -> Vec<u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("syscall")).ok())
        .filter_map(|s| syscall_sp(&s))
        .collect()
}

/// The stack pointer of one `/proc/PID/task/TID/syscall` line.
fn syscall_sp(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 3 {
        return None;
    }
    let sp = fields[fields.len() - 2].strip_prefix("0x")?;
    u64::from_str_radix(sp, 16).ok()
}

/// PSS by category, in MiB (per VM when averaged with [`Breakdown::mean`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Breakdown {
    /// The whole process (the sum of the rest).
    pub total: f64,
    /// Pages no other process maps (USS): what the process alone costs, whatever else runs
    /// on the host. The rest of `total` is its share of pages it shares.
    pub private: f64,
    /// Guest RAM.
    pub guest_ram: f64,
    /// …of which private pages (a clone's copies of template pages it wrote).
    pub guest_ram_private: f64,
    /// TCG's translation buffer (TCG only).
    pub tcg_buffer: f64,
    /// glibc's main arena (`[heap]`).
    pub heap: f64,
    /// glibc's other arenas (one per thread that allocated, up to 8 × cores).
    pub arenas: f64,
    /// RAM blocks besides the guest's: ROMs, BIOS, ACPI tables.
    pub ram_blocks: f64,
    /// The QEMU executable.
    pub qemu_binary: f64,
    /// Shared libraries and other files.
    pub libraries: f64,
    /// …of which, with the binary's, private pages (relocations, `.data`, `.bss`).
    pub file_private: f64,
    /// Thread stacks.
    pub stacks: f64,
    /// Other anonymous memory and the kernel's mappings.
    pub other: f64,
    /// Memory in transparent huge pages (`AnonHugePages`, resident size, not PSS).
    pub anon_huge: f64,
}

impl Breakdown {
    /// Classifies `maps` of a process whose executable is `exe`, whose guest has `guest_mib`
    /// of RAM and whose blocked threads' stack pointers are `sps`.
    pub fn classify(maps: &[Mapping], exe: &str, guest_mib: u64, sps: &[u64]) -> Self {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let mut b = Self::default();
        for (i, m) in maps.iter().enumerate() {
            let pss = mib(m.pss);
            b.total += pss;
            b.private += mib(m.private);
            b.anon_huge += mib(m.anon_huge);
            let slot = if m.has_flag("dc") && m.size_kib() >= guest_mib * 1024 {
                b.guest_ram_private += mib(m.private);
                &mut b.guest_ram
            } else if m.name.starts_with("/memfd:tcg-jit")
                || (m.anonymous() && m.perms.contains('x'))
            {
                &mut b.tcg_buffer
            } else if m.has_flag("dc") {
                &mut b.ram_blocks
            } else if m.name.starts_with('/') {
                b.file_private += mib(m.private);
                if m.name.trim_end_matches(" (deleted)") == exe {
                    &mut b.qemu_binary
                } else {
                    &mut b.libraries
                }
            } else if m.name == "[heap]" {
                &mut b.heap
            } else if m.name == "[stack]" || sps.iter().any(|&sp| (m.start..m.end).contains(&sp)) {
                &mut b.stacks
            } else if m.anonymous() && is_arena(m, maps.get(i + 1)) {
                &mut b.arenas
            } else {
                &mut b.other
            };
            *slot += pss;
        }
        b
    }

    /// The breakdown of the live process `pid` (a VM with `guest_mib` of RAM).
    pub fn of_pid(pid: u32, guest_mib: u64) -> Result<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .with_context(|| format!("Cannot read the smaps of {pid}"))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let maps = parse(&text)?;
        Ok(Self::classify(
            &maps,
            &exe.to_string_lossy(),
            guest_mib,
            &stack_pointers(pid),
        ))
    }

    /// The field-by-field mean of `all` (all zero when empty).
    pub fn mean(all: &[Self]) -> Self {
        let n = all.len().max(1) as f64;
        let mut m = Self::default();
        for b in all {
            for (sum, v) in m.fields_mut().into_iter().zip(b.fields()) {
                *sum += v / n;
            }
        }
        m
    }

    fn fields(&self) -> [f64; 14] {
        [
            self.total,
            self.private,
            self.guest_ram,
            self.guest_ram_private,
            self.tcg_buffer,
            self.heap,
            self.arenas,
            self.ram_blocks,
            self.qemu_binary,
            self.libraries,
            self.file_private,
            self.stacks,
            self.other,
            self.anon_huge,
        ]
    }

    fn fields_mut(&mut self) -> [&mut f64; 14] {
        [
            &mut self.total,
            &mut self.private,
            &mut self.guest_ram,
            &mut self.guest_ram_private,
            &mut self.tcg_buffer,
            &mut self.heap,
            &mut self.arenas,
            &mut self.ram_blocks,
            &mut self.qemu_binary,
            &mut self.libraries,
            &mut self.file_private,
            &mut self.stacks,
            &mut self.other,
            &mut self.anon_huge,
        ]
    }

    /// `(label, value)` rows for a table, in the order of the fields.
    pub fn rows(&self) -> [(&'static str, f64); 14] {
        let labels = [
            "total",
            "  of which private to it (USS)",
            "guest RAM",
            "  of which private (copied)",
            "TCG translation buffer",
            "heap (main arena)",
            "other malloc arenas",
            "ROM/BIOS/ACPI RAM blocks",
            "QEMU binary",
            "shared libraries",
            "  binary+libs private pages",
            "thread stacks",
            "other anonymous",
            "in huge pages (RSS)",
        ];
        let mut out = [("", 0.0); 14];
        for (o, (l, v)) in out.iter_mut().zip(labels.into_iter().zip(self.fields())) {
            *o = (l, v);
        }
        out
    }
}

/// glibc's non-main arenas are mapped 64 MiB-aligned, and what is not yet used of their 64 MiB
/// follows as an inaccessible (`---p`) anonymous mapping.
fn is_arena(m: &Mapping, next: Option<&Mapping>) -> bool {
    const HEAP_MAX: u64 = 64 << 20;
    let aligned = m.start.is_multiple_of(HEAP_MAX) && m.perms.starts_with("rw");
    let reserve_follows =
        next.is_some_and(|n| n.start == m.end && n.anonymous() && n.perms.starts_with("---"));
    aligned && (reserve_follows || m.end - m.start == HEAP_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two lines of a mapping's fields, as the kernel writes them.
    fn fields(pss: u64, private: u64, huge: u64, flags: &str) -> String {
        format!(
            "Size:               4 kB\nRss:                {pss} kB\nPss:                {pss} kB\n\
             Private_Clean:        0 kB\nPrivate_Dirty:  {private} kB\n\
             AnonHugePages:  {huge} kB\nVmFlags: {flags}\n"
        )
    }

    fn sample() -> String {
        let exe = "/usr/bin/qemu-system-x86_64";
        [
            format!("555500000000-555500400000 r-xp 00000000 fe:00 1  {exe}\n"),
            fields(1000, 0, 0, "rd ex mr mw me"),
            format!("555500400000-555500500000 rw-p 00400000 fe:00 1  {exe}\n"),
            fields(900, 900, 0, "rd wr mr mw me ac"),
            "555600000000-555600800000 rw-p 00000000 00:00 0  [heap]\n".into(),
            fields(5000, 5000, 0, "rd wr mr mw me ac"),
            // An arena: 64 MiB-aligned, its reserve after it.
            "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n".into(),
            fields(1024, 1024, 0, "rd wr mr mw me nr"),
            "7f0000100000-7f0004000000 ---p 00000000 00:00 0 \n".into(),
            fields(0, 0, 0, "mr mw me nr"),
            // Guest RAM: the template's memory file, 256 MiB, partly copied.
            "7f1000000000-7f1010000000 rw-p 00000000 00:29 3   /dev/shm/tpl/memory\n".into(),
            fields(4000, 700, 0, "rd wr mr mw me dc ac hg mg"),
            // TCG's buffer (executable anonymous) in huge pages.
            "7f2000000000-7f2002000000 rwxp 00000000 00:00 0 \n".into(),
            fields(6144, 6144, 6144, "rd wr ex mr mw me ac hg"),
            // An ACPI-table RAM block.
            "7f3000000000-7f3000200000 rw-p 00000000 00:00 0 \n".into(),
            fields(2048, 2048, 2048, "rd wr mr mw me dc ac hg mg"),
            "7f4000000000-7f4000100000 r--p 00000000 fe:00 2   /usr/lib/libc.so.6\n".into(),
            fields(300, 100, 0, "rd mr mw me"),
            // A thread stack (a thread's SP is inside) and plain anonymous memory.
            "7f5000001000-7f5000801000 rw-p 00000000 00:00 0 \n".into(),
            fields(12, 12, 0, "rd wr mr mw me ac"),
            "7f6000000000-7f6000100000 rw-p 00000000 00:00 0 \n".into(),
            fields(500, 500, 0, "rd wr mr mw me ac"),
            "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0   [stack]\n".into(),
            fields(40, 40, 0, "rd wr mr mw me gd ac"),
        ]
        .concat()
    }

    #[test]
    fn parses_headers_fields_and_names() {
        let maps = parse(&sample()).expect("parse");
        assert_eq!(maps.len(), 12);
        assert_eq!(maps[0].name, "/usr/bin/qemu-system-x86_64");
        assert_eq!(maps[0].perms, "r-xp");
        assert_eq!((maps[0].start, maps[0].pss), (0x5555_0000_0000, 1000));
        assert_eq!(maps[3].name, "", "anonymous");
        assert_eq!(maps[5].name, "/dev/shm/tpl/memory");
        assert_eq!(maps[5].private, 700);
        assert!(maps[5].has_flag("dc"));
        assert_eq!(maps[6].anon_huge, 6144);
        assert!(parse("Pss: 4 kB\n").is_err(), "a field before any mapping");
        assert!(parse("").expect("empty").is_empty());
    }

    #[test]
    fn classifies_every_kind_of_mapping() {
        let maps = parse(&sample()).expect("parse");
        let sp = 0x7f50_0000_2000;
        let b = Breakdown::classify(&maps, "/usr/bin/qemu-system-x86_64", 256, &[sp]);
        let mib = |kib: f64| kib / 1024.0;
        assert_eq!(b.qemu_binary, mib(1900.0));
        assert_eq!(b.heap, mib(5000.0));
        assert_eq!(b.arenas, mib(1024.0));
        assert_eq!(b.guest_ram, mib(4000.0));
        assert_eq!(b.guest_ram_private, mib(700.0));
        assert_eq!(b.tcg_buffer, mib(6144.0));
        assert_eq!(b.ram_blocks, mib(2048.0));
        assert_eq!(b.libraries, mib(300.0));
        assert_eq!(b.file_private, mib(1000.0));
        assert_eq!(b.stacks, mib(52.0));
        assert_eq!(b.other, mib(500.0));
        assert_eq!(b.anon_huge, mib(8192.0));
        let private = 900.0 + 5000.0 + 1024.0 + 700.0 + 6144.0 + 2048.0 + 100.0 + 12.0 + 540.0;
        assert!((b.private - mib(private)).abs() < 1e-9, "{}", b.private);
        let parts = b.guest_ram
            + b.tcg_buffer
            + b.heap
            + b.arenas
            + b.ram_blocks
            + b.qemu_binary
            + b.libraries
            + b.stacks
            + b.other;
        assert!((b.total - parts).abs() < 1e-9, "the parts add up");
        // Without the thread's SP, its stack is plain anonymous memory.
        let b = Breakdown::classify(&maps, "/usr/bin/qemu-system-x86_64", 256, &[]);
        assert_eq!((b.stacks, b.other), (mib(40.0), mib(512.0)));
        // A guest larger than the file: it is no guest RAM but another RAM block.
        let b = Breakdown::classify(&maps, "/usr/bin/qemu-system-x86_64", 512, &[]);
        assert_eq!((b.guest_ram, b.ram_blocks), (0.0, mib(6048.0)));
    }

    #[test]
    fn stack_pointer_of_a_syscall_line() {
        assert_eq!(
            syscall_sp("7 0x7f 0x3 0xffffffff 0x1 0x0 0x0 0x7f4ee25f9600 0x7f4ee3bf5829\n"),
            Some(0x7f4e_e25f_9600)
        );
        assert_eq!(syscall_sp("-1 0x7ffd1000 0x7f00\n"), Some(0x7ffd_1000));
        assert_eq!(syscall_sp("running\n"), None);
        assert_eq!(syscall_sp(""), None);
    }

    #[test]
    fn mean_of_breakdowns() {
        let a = Breakdown {
            total: 10.0,
            heap: 4.0,
            ..Breakdown::default()
        };
        let b = Breakdown {
            total: 20.0,
            heap: 2.0,
            ..Breakdown::default()
        };
        let m = Breakdown::mean(&[a, b]);
        assert_eq!((m.total, m.heap), (15.0, 3.0));
        assert_eq!(Breakdown::mean(&[]), Breakdown::default());
        assert_eq!(m.rows()[0], ("total", 15.0));
    }
}
