//! The printed report: preamble, machine limits, the backend table, the targets.

use crate::backend::Mode;
use crate::limits::Limits;
use crate::workload::{After, Cfg, Cycle};

pub struct Row {
    pub backend: String,
    pub size: usize,
    pub phase: String,
    pub rate: f64,
    /// The machine's limit for this phase, msgs/s.
    pub limit: Option<f64>,
    pub after: Option<After>,
}

impl Row {
    pub fn rate(backend: &str, size: usize, phase: &str, rate: f64, limit: Option<f64>) -> Row {
        Row {
            backend: backend.into(),
            size,
            phase: phase.into(),
            rate,
            limit,
            after: None,
        }
    }
}

#[derive(Default)]
pub struct Table {
    pub rows: Vec<Row>,
}

pub const ENQ: &str = "A enqueue";
pub const DRAIN: &str = "B drain";
pub const ACK: &str = "C ack";
pub const CYCLE: &str = "cycle A+B+C";

pub fn phase_name(p: &str, mode: Mode) -> String {
    match mode {
        Mode::Sync => format!("{p}, fsync/64"),
        Mode::NoSync => format!("{p}, no fsync"),
    }
}

impl Table {
    pub fn push(&mut self, r: Row) {
        self.rows.push(r);
    }

    pub fn cycle(
        &mut self,
        backend: &str,
        size: usize,
        mode: Mode,
        cfg: &Cfg,
        c: &Cycle,
        lim: &Limits,
    ) {
        let n = cfg.messages as f64;
        let (enq_t, drain_t, ack_t) = match mode {
            Mode::Sync => (
                c.enqueue_commits as f64 * lim.commit_secs(size),
                n / lim.open_rate(size),
                c.ack_commits as f64 * lim.fsync_p50,
            ),
            Mode::NoSync => (n / lim.seal_rate(size), n / lim.open_rate(size), 0.0),
        };
        let limit = |t: f64| (t > 0.0).then(|| n / t);
        for (p, secs, l) in [
            (ENQ, c.enqueue, limit(enq_t)),
            (DRAIN, c.drain, limit(drain_t)),
            (ACK, c.ack, limit(ack_t)),
        ] {
            self.push(Row::rate(backend, size, &phase_name(p, mode), n / secs, l));
        }
        let mut r = Row::rate(
            backend,
            size,
            &phase_name(CYCLE, mode),
            n / c.total(),
            limit(enq_t + drain_t + ack_t),
        );
        r.after.clone_from(&c.after);
        self.push(r);
    }

    pub fn find(&self, backend: &str, size: usize, phase: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.backend == backend && r.size == size && r.phase == phase)
    }

    /// The best peer (not cinder) for a size and phase.
    pub fn best_peer(&self, size: usize, phase: &str) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| r.backend != "cinder" && r.size == size && r.phase == phase)
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
    }

    pub fn print(&self) {
        println!("\n## Backends\n");
        println!("| backend | payload | phase | msgs/s | MB/s | vs cinder | vs limit | bytes on disk after acks | deleted data still on disk | key that opens it exists |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let vs_cinder = self
                .find("cinder", r.size, &r.phase)
                .map_or("—".into(), |c| format!("{:.2}", r.rate / c.rate));
            let vs_limit = r.limit.map_or("—".into(), |l| format!("{:.2}", r.rate / l));
            let (bytes, found, key) = match &r.after {
                Some(a) => (
                    a.bytes_on_disk.to_string(),
                    format!(
                        "{} ({}/{} samples)",
                        if a.samples_found > 0 { "yes" } else { "no" },
                        a.samples_found,
                        a.samples
                    ),
                    if a.key_exists { "yes" } else { "no" }.to_string(),
                ),
                None => ("".into(), "".into(), "".into()),
            };
            println!(
                "| {} | {} B | {} | {:.0} | {:.1} | {vs_cinder} | {vs_limit} | {bytes} | {found} | {key} |",
                r.backend,
                r.size,
                r.phase,
                r.rate,
                r.rate * r.size as f64 / 1e6,
            );
        }
        println!("\nPhase D (after every ack, before measuring the data dir):\n");
        for r in &self.rows {
            if let Some(a) = &r.after {
                println!(
                    "- {} {} B: {} ({:.2} s)",
                    r.backend, r.size, a.settle, a.settle_secs
                );
            }
        }
    }
}

pub fn preamble(sizes: &[usize]) {
    let cmd = |c: &str, args: &[&str]| {
        std::process::Command::new(c)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let model = cmd("lscpu", &[])
        .lines()
        .find(|l| l.starts_with("Model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    println!("# cinder-peers\n");
    println!("- date: {}", cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]));
    println!("- machine: nproc {}, {model}", cmd("nproc", &[]));
    println!(
        "- command: `{}`",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("- payload sizes: {sizes:?}");
    let lock = include_str!("../Cargo.lock");
    let mut versions = Vec::new();
    let mut name = "";
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = n.trim_matches('"');
        } else if let Some(v) = line.strip_prefix("version = ") {
            if [
                "rocksdb",
                "librocksdb-sys",
                "fjall",
                "lsm-tree",
                "redb",
                "rusqlite",
                "libsqlite3-sys",
                "ring",
            ]
            .contains(&name)
            {
                versions.push(format!("{name} {}", v.trim_matches('"')));
            }
        }
    }
    println!("- crates: {}\n", versions.join(", "));
}

pub fn limits(l: &Limits) {
    println!("## Machine limits (same run)\n");
    println!("| limit | value |\n|---|---|");
    for (s, seal, open) in &l.aead {
        println!(
            "| ChaCha20-Poly1305 (ring), one core, {s} B | seal {seal:.0}/s ({:.2} GB/s), open {open:.0}/s ({:.2} GB/s) |",
            seal * *s as f64 / 1e9,
            open * *s as f64 / 1e9
        );
    }
    println!(
        "| sequential write, fdatasync every 4 MiB | {:.0} MB/s |",
        l.seq_write / 1e6
    );
    println!(
        "| fdatasync after a 4 KiB append | p50 {:.0} µs, p99 {:.0} µs |",
        l.fsync_p50 * 1e6,
        l.fsync_p99 * 1e6
    );
    println!("| memcpy, 64 MiB buffers | {:.1} GB/s |", l.memcpy / 1e9);
    for (s, t) in &l.commit {
        println!(
            "| one commit of a batch of {s} B messages (write + fdatasync), median | {:.0} µs |",
            t * 1e6
        );
    }
    println!();
    println!("Limits per phase (msgs/s): enqueue with fsync = n / (commits · one measured commit of a batch of that size); drain = one core's open rate; ack with fsync = n / (commits · fsync p50); enqueue without fsync = one core's seal rate; a cycle = n / (sum of its phases' limit times); writers = min(seal rate, seq. write / size); mixed = batch / (2 · fsync p50 + batch · size / seq. write).\n");
}

pub fn writers_limit(l: &Limits, size: usize) -> f64 {
    l.seal_rate(size).min(l.seq_write / size as f64)
}

pub fn mixed_limit(l: &Limits, size: usize, batch: usize) -> f64 {
    batch as f64 / (2.0 * l.fsync_p50 + batch as f64 * size as f64 / l.seq_write)
}

/// The targets, each with its numbers and met / MISSED.
pub fn targets(t: &Table, lim: &Limits, sizes: &[usize]) {
    println!("\n## Targets\n");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for &size in sizes {
        for p in [ENQ, DRAIN, ACK] {
            let name = phase_name(p, Mode::Sync);
            if let Some(c) = t.find("cinder", size, &name) {
                if let Some(l) = c.limit {
                    println!(
                        "- {size} B {name}: cinder at {:.2} of its limit (target ≥ 0.80): {}",
                        c.rate / l,
                        verdict(c.rate / l >= 0.8)
                    );
                }
            }
        }
        for (mode, want) in [(Mode::Sync, 1.8), (Mode::NoSync, 3.0)] {
            let name = phase_name(CYCLE, mode);
            if let (Some(c), Some(p)) = (t.find("cinder", size, &name), t.best_peer(size, &name)) {
                println!(
                    "- {size} B {name}: cinder {:.0} msgs/s = {:.2}x the best peer ({} {:.0}) (target ≥ {want}x): {}",
                    c.rate,
                    c.rate / p.rate,
                    p.backend,
                    p.rate,
                    verdict(c.rate / p.rate >= want)
                );
            }
        }
        if let Some(a) = t
            .find("cinder", size, &phase_name(CYCLE, Mode::Sync))
            .and_then(|r| r.after.as_ref())
        {
            let rest = a.bytes_on_disk.saturating_sub(a.active_bytes);
            println!(
                "- {size} B after all acks: cinder data dir {} bytes: {} in segment files still being written (active and spare, preallocated), {rest} in everything else; deleted ciphertext found {}/{}; a key that opens deleted records exists: {} (target: nothing openable, the rest < 1 MiB): {}",
                a.bytes_on_disk,
                a.active_bytes,
                a.samples_found,
                a.samples,
                a.key_exists,
                verdict(!a.key_exists && a.samples_found == 0 && rest < 1 << 20)
            );
        }
    }
    for r in t
        .rows
        .iter()
        .filter(|r| r.backend == "cinder" && r.phase.contains("writers"))
    {
        if let Some(p) = t.best_peer(r.size, &r.phase) {
            println!(
                "- {} B {}: cinder {:.0} msgs/s = {:.2}x the best peer ({} {:.0}) (target ≥ 3x): {}",
                r.size,
                r.phase,
                r.rate,
                r.rate / p.rate,
                p.backend,
                p.rate,
                verdict(r.rate / p.rate >= 3.0)
            );
        }
    }
    if let Some(c) = t.find("cinder", 1024, &phase_name(ENQ, Mode::NoSync)) {
        let seal = lim.seal_rate(1024);
        println!(
            "- 1024 B enqueue without fsync: cinder {:.0} msgs/s = {:.2} of the one-core seal rate {seal:.0} (target ≥ 0.50): {}",
            c.rate,
            c.rate / seal,
            verdict(c.rate / seal >= 0.5)
        );
    }
}
