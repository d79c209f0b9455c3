//! Durable means durable: a child appending and acking under `Sync` and `Group` is killed
//! with SIGKILL at random moments, many times. After each reopen, every append that
//! returned is present (unless acked) with its payload, and no acked message comes back.

mod common;

use std::path::Path;

use cinder::Store;
use common::{jitter, options, payload, run_child, Ledger, QUEUES};

#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("CINDER_CHILD") {
        common::child_main(&spec);
    }
}

fn check(dir: &Path, key: &Path, ledger: &Ledger) -> usize {
    let store = Store::open(dir, options(key, "group")).expect("reopen after kill");
    let mut present = 0;
    for q in 0..QUEUES {
        let msgs = store
            .read(format!("q{q}").as_bytes(), None, 1_000_000)
            .unwrap();
        let ids: std::collections::HashMap<u64, &Vec<u8>> =
            msgs.iter().map(|m| (m.id.0, &m.payload)).collect();
        for (&(aq, id), &n) in &ledger.appended {
            if aq != q || ledger.ack_tried.contains(&(q, id)) {
                continue;
            }
            let got = ids
                .get(&id)
                .unwrap_or_else(|| panic!("returned append q{q}/{id} (n={n}) lost"));
            assert_eq!(**got, payload(q, n), "payload of q{q}/{id} changed");
        }
        for &(kq, id) in &ledger.acked {
            assert!(
                kq != q || !ids.contains_key(&id),
                "acked message q{q}/{id} came back"
            );
        }
        for m in &msgs {
            assert!(
                m.payload.starts_with(format!("p-{q}-").as_bytes()),
                "foreign payload in q{q}"
            );
        }
        assert!(
            msgs.windows(2).all(|w| w[0].id < w[1].id),
            "FIFO order broken in q{q}"
        );
        present += msgs.len();
    }
    store.close().unwrap();
    present
}

fn crash_cycles(mode: &str, cycles: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    cinder::FileKeyProvider::create(&key).unwrap();
    let dir = tmp.path().join("data");
    let mut ledger = Ledger::default();
    for c in 0..cycles {
        let base = c * 1_000_000;
        run_child(
            "child_entry",
            &dir,
            &key,
            mode,
            base,
            jitter(c + 7, 80, 400),
            &mut ledger,
        );
        check(&dir, &key, &ledger);
    }
    assert!(
        ledger.appended.len() > 100,
        "the child barely ran: {} appends",
        ledger.appended.len()
    );
    assert!(!ledger.acked.is_empty(), "the child never acked");
}

#[test]
fn sigkill_under_sync() {
    crash_cycles("sync", 12);
}

#[test]
fn sigkill_under_group() {
    crash_cycles("group", 12);
}
