//! No plaintext at rest and no unwrapped key on disk: canary queue ids, payloads and
//! expiry times, and every data key, are absent from every byte of the data dir. After
//! everything is acked or expired, the segments holding it and their keys are gone.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cinder::format::keystore::KeystoreImage;
use cinder::{Clock, FileKeyProvider, KeyProvider, ManualClock, MessageId, Options, Store};

fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect()
}

fn assert_absent(dir: &Path, needle: &[u8], what: &str) {
    for (name, bytes) in all_bytes(dir) {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{what} found in plaintext in {name}"
        );
    }
}

/// The data keys, unwrapped with the documented keystore format and wrap context.
fn deks(dir: &Path, key: &FileKeyProvider) -> Vec<(u64, [u8; 32])> {
    let img = KeystoreImage::decode(&std::fs::read(dir.join("KEYS")).unwrap()).unwrap();
    img.entries
        .iter()
        .map(|e| {
            let mut ctx = b"cinder dek".to_vec();
            ctx.extend_from_slice(&e.segment_id.to_le_bytes());
            ctx.extend_from_slice(&e.dek_id.to_le_bytes());
            let dek = key
                .unwrap(&e.wrapped, &ctx)
                .unwrap()
                .expect("documented wrap context");
            (e.segment_id, *dek.expose())
        })
        .collect()
}

fn segment_ids(dir: &Path) -> HashSet<String> {
    all_bytes(dir)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| Path::new(n).extension().is_some_and(|e| e == "seg"))
        .collect()
}

#[test]
fn nothing_secret_at_rest_and_shredding_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let clock = ManualClock::new(1_765_000_000_000);
    let opts = || {
        let mut o = Options::new(key.clone());
        o.segment_size = 64 << 10;
        o.max_message_size = 8 << 10;
        o.clock = clock.clone();
        o.background_reaper = false;
        o
    };
    let store = Store::open(&dir, opts()).unwrap();
    let queues: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("CANARY-QUEUE-{i}-b7d1").into_bytes())
        .collect();
    let mut ids: Vec<(usize, MessageId, u64)> = Vec::new();
    for n in 0..300usize {
        let q = n % queues.len();
        let payload = format!("CANARY-PAYLOAD-{n:04}-{}", "s".repeat(n % 700));
        let ttl = Duration::from_secs(600 + n as u64);
        let id = store.append(&queues[q], payload.as_bytes(), ttl).unwrap();
        ids.push((q, id, clock.now_ms() + ttl.as_millis() as u64));
    }
    for (q, id, _) in ids.iter().step_by(3) {
        assert!(store.ack(&queues[*q], *id).unwrap());
    }
    store.flush().unwrap();
    let live_deks = deks(&dir, &key);
    assert!(
        live_deks.len() >= 3,
        "expected several segments, got {}",
        live_deks.len()
    );
    let check = || {
        for q in &queues {
            assert_absent(&dir, q, "a queue id");
        }
        assert_absent(&dir, b"CANARY", "a payload");
        for (_, _, exp) in &ids {
            assert_absent(&dir, &exp.to_le_bytes(), "an expiry time");
        }
        for (seg, k) in &live_deks {
            assert_absent(&dir, k, &format!("the data key of segment {seg}"));
        }
        assert_absent(
            &dir,
            &std::fs::read(tmp.path().join("key")).unwrap(),
            "the master key",
        );
    };
    check(); // while open
    store.close().unwrap();
    drop(store);
    check(); // after a clean close
    let before = segment_ids(&dir);

    // Ack the rest: every segment of the first session dies and is shredded.
    let store = Store::open(&dir, opts()).unwrap();
    for q in &queues {
        let all = store.read(q, None, 10_000).unwrap();
        assert!(!all.is_empty());
        store
            .ack_batch(q, &all.iter().map(|m| m.id).collect::<Vec<_>>())
            .unwrap();
    }
    store.close().unwrap();
    drop(store);
    let store = Store::open(&dir, opts()).unwrap();
    assert_eq!(store.stats().live_messages, 0);
    let after = segment_ids(&dir);
    assert!(
        before.is_disjoint(&after),
        "shredded segment files remain: {:?}",
        before.intersection(&after).collect::<Vec<_>>()
    );
    let left: HashSet<u64> = deks(&dir, &key).into_iter().map(|(s, _)| s).collect();
    for (seg, _) in &live_deks {
        assert!(
            !left.contains(seg),
            "key of shredded segment {seg} still in the keystore"
        );
    }
}

#[test]
fn expired_messages_are_shredded_without_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let clock = ManualClock::new(1_765_000_000_000);
    let mut o = Options::new(key);
    o.segment_size = 64 << 10;
    o.max_message_size = 8 << 10;
    o.clock = clock.clone();
    o.background_reaper = false;
    let store = Store::open(tmp.path().join("data"), o).unwrap();
    for n in 0..200 {
        store
            .append(
                b"expiring",
                format!("CANARY-EXP-{n}").as_bytes(),
                Duration::from_secs(30),
            )
            .unwrap();
    }
    store.flush().unwrap();
    clock.advance(Duration::from_secs(31));
    assert_eq!(
        store.read(b"expiring", None, 10).unwrap().len(),
        0,
        "expired messages returned"
    );
    store.maintain().unwrap();
    // No record of an expired message is left decryptable: its segment lost its key.
    let stats = store.stats();
    assert_eq!(stats.dead_records, 0, "{stats:?}");
    assert_eq!(stats.live_messages, 0, "{stats:?}");
    assert!(stats.shreds > 0);
}

#[test]
fn after_the_deadline_only_live_messages_have_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let clock = ManualClock::new(1_765_000_000_000);
    let mut o = Options::new(key.clone());
    o.segment_size = 64 << 10;
    o.max_message_size = 8 << 10;
    o.clock = clock.clone();
    o.background_reaper = false;
    let dir = tmp.path().join("data");
    let store = Store::open(&dir, o).unwrap();
    let mut kept = Vec::new();
    for n in 0..400usize {
        let q = format!("CANARY-Q-{}", n % 7);
        let payload = format!("CANARY-DEADLINE-{n:04}-{}", "p".repeat(n % 900));
        let id = store
            .append(
                q.as_bytes(),
                payload.as_bytes(),
                Duration::from_secs(86_400),
            )
            .unwrap();
        if n % 10 == 0 {
            kept.push((q, id, payload));
        } else {
            assert!(store.ack(q.as_bytes(), id).unwrap());
        }
    }
    store.flush().unwrap();
    // The segments holding acked messages (not the ack log or the spare), and their keys.
    let report =
        cinder::inspect(&dir, Some(&*key as &dyn KeyProvider), clock.now_ms(), false).unwrap();
    let with_acked: HashSet<u64> = report
        .segments
        .iter()
        .filter(|s| s.acked.unwrap_or(0) > 0)
        .map(|s| s.id)
        .collect();
    assert!(with_acked.len() >= 2, "{report:?}");
    let before: Vec<(u64, [u8; 32])> = deks(&dir, &key)
        .into_iter()
        .filter(|(s, _)| with_acked.contains(s))
        .collect();
    // Past the deadline (60 s by default): every segment that held an acked message has
    // been compacted and shredded; the survivors live in new segments under new keys.
    clock.advance(Duration::from_secs(61));
    store.maintain().unwrap();
    let after: HashSet<u64> = deks(&dir, &key).into_iter().map(|(s, _)| s).collect();
    for (seg, k) in &before {
        assert!(
            !after.contains(seg),
            "segment {seg} with acked messages still has a key"
        );
        assert_absent(&dir, k, "a shredded data key");
    }
    assert_absent(&dir, b"CANARY", "a payload or queue id");
    for (q, id, payload) in kept {
        let page = store.read(q.as_bytes(), None, 1000).unwrap();
        assert!(
            page.iter()
                .any(|m| m.id == id && m.payload == payload.as_bytes()),
            "live message lost"
        );
    }
    let st = store.stats();
    assert_eq!(st.dead_records, 0, "{st:?}");
    assert!(st.bytes_copied > 0);
}
