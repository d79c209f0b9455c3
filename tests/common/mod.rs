//! Shared harness for tests that kill a child process with SIGKILL.
//!
//! The child is the test binary itself, re-run with `CINDER_CHILD=<dir>|<key>|<mode>|<base>`
//! and a filter that selects its `child_entry` test. It appends and acks from several
//! threads and prints `@@A queue id n` after each append returned and `@@K queue id`
//! after each ack returned. The parent kills it at a random moment.
#![allow(dead_code)]

pub mod openable;
pub mod rig;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cinder::{Durability, FileKeyProvider, MessageId, Options, Store};

pub const QUEUES: u64 = 4;

pub fn options(key: &Path, mode: &str) -> Options {
    let mut o = Options::new(Arc::new(FileKeyProvider::open(key).expect("key")));
    o.segment_size = 64 << 10;
    o.max_message_size = 4 << 10;
    // Compaction runs in the background all the time, so kills land in the middle of it.
    o.max_shred_delay = Duration::from_millis(400);
    o.durability = match mode {
        "sync" => Durability::Sync,
        "group" => Durability::default(),
        "async" => Durability::Async,
        m => panic!("mode {m}"),
    };
    o
}

pub fn payload(q: u64, n: u64) -> Vec<u8> {
    let mut p = format!("p-{q}-{n}-").into_bytes();
    p.resize(40 + (n as usize * 37) % 900, b'x');
    p
}

/// Runs in the child: append and ack forever (until killed).
pub fn child_main(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let (dir, key, mode, base): (&str, &str, &str, u64) =
        (parts[0], parts[1], parts[2], parts[3].parse().unwrap());
    let store = Arc::new(Store::open(dir, options(Path::new(key), mode)).expect("child open"));
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..QUEUES)
        .map(|q| {
            let store = Arc::clone(&store);
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                let name = format!("q{q}");
                let mut mine: Vec<u64> = Vec::new();
                for i in 0.. {
                    let n = base + i * QUEUES + q;
                    let id = store
                        .append(name.as_bytes(), &payload(q, n), Duration::from_secs(3600))
                        .expect("append");
                    say(&out, &format!("@@A {q} {} {n}", id.0));
                    mine.push(id.0);
                    if i % 3 == 2 {
                        let victim = mine.remove(mine.len() / 2);
                        say(&out, &format!("@@T {q} {victim}"));
                        if store.ack(name.as_bytes(), MessageId(victim)).expect("ack") {
                            say(&out, &format!("@@K {q} {victim}"));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn say(out: &std::sync::Mutex<std::io::Stdout>, line: &str) {
    let o = out.lock().unwrap();
    let mut l = o.lock();
    let _ = writeln!(l, "{line}");
    let _ = l.flush();
}

/// What the parent learned from a killed child.
#[derive(Default, Debug)]
pub struct Ledger {
    /// (queue, id) → n, for appends that returned.
    pub appended: HashMap<(u64, u64), u64>,
    /// (queue, id) for acks that returned.
    pub acked: HashSet<(u64, u64)>,
    /// (queue, id) for acks that were started (they may or may not have happened).
    pub ack_tried: HashSet<(u64, u64)>,
}

/// Spawns the child, kills it after `after`, and records what it reported.
pub fn run_child(
    test_name: &str,
    dir: &Path,
    key: &Path,
    mode: &str,
    base: u64,
    after: Duration,
    ledger: &mut Ledger,
) {
    let exe = std::env::current_exe().unwrap();
    let spec = format!("{}|{}|{mode}|{base}", dir.display(), key.display());
    let mut child = Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env("CINDER_CHILD", spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(stdout).lines() {
            match l {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        lines
    });
    std::thread::sleep(after);
    child.kill().expect("SIGKILL child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "child exited on its own: {status:?}");
    for line in reader.join().unwrap() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first() {
            Some(&"@@A") if f.len() == 4 => {
                ledger.appended.insert(
                    (f[1].parse().unwrap(), f[2].parse().unwrap()),
                    f[3].parse().unwrap(),
                );
            }
            Some(&"@@T") if f.len() == 3 => {
                ledger
                    .ack_tried
                    .insert((f[1].parse().unwrap(), f[2].parse().unwrap()));
            }
            Some(&"@@K") if f.len() == 3 => {
                ledger
                    .acked
                    .insert((f[1].parse().unwrap(), f[2].parse().unwrap()));
            }
            _ => {} // test-harness chatter, or a line cut by the kill
        }
    }
}

/// A cheap deterministic "random" duration in `lo..hi` ms.
pub fn jitter(seed: u64, lo: u64, hi: u64) -> Duration {
    let x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0xD1B5_4A32_D192_ED03;
    Duration::from_millis(lo + x % (hi - lo))
}
