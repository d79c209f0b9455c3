//! Concurrency: threads appending, reading and acking on the same and on different queues;
//! no message is lost or delivered twice, and each queue stays in FIFO order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cinder::{Durability, FileKeyProvider, MessageId, Options, Store};

const PRODUCERS: usize = 4;
const PER: usize = 600;
const QUEUES: usize = 3;

fn run(durability: Durability) {
    run_with(durability, Duration::from_secs(60));
}

fn run_with(durability: Durability, max_shred_delay: Duration) {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut o = Options::new(key);
    o.segment_size = 256 << 10;
    o.max_message_size = 16 << 10;
    o.durability = durability;
    o.max_shred_delay = max_shred_delay;
    let store = Arc::new(Store::open(tmp.path().join("data"), o).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..PER {
                    // Producers share queues: every queue gets every producer.
                    let q = format!("q{}", (p + i) % QUEUES);
                    let payload = format!("{p}:{i}");
                    store
                        .append(q.as_bytes(), payload.as_bytes(), Duration::from_secs(600))
                        .unwrap();
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..QUEUES)
        .map(|q| {
            let store = Arc::clone(&store);
            let done = Arc::clone(&done);
            let received = Arc::clone(&received);
            std::thread::spawn(move || {
                let name = format!("q{q}");
                let mut cursor: Option<MessageId> = None;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let page = store.read(name.as_bytes(), cursor, 37).unwrap();
                    if page.is_empty() {
                        if finished {
                            break;
                        }
                        store
                            .wait(name.as_bytes(), cursor, Duration::from_millis(50))
                            .unwrap();
                        continue;
                    }
                    for w in page.windows(2) {
                        assert!(w[0].id < w[1].id, "FIFO order broken");
                    }
                    if let Some(c) = cursor {
                        assert!(page[0].id > c, "cursor went backwards");
                    }
                    cursor = Some(page.last().unwrap().id);
                    // Ack half one by one, the rest cumulatively.
                    let (one, _) = page.split_at(page.len() / 2);
                    for m in one {
                        assert!(
                            store.ack(name.as_bytes(), m.id).unwrap(),
                            "ack of a delivered message failed"
                        );
                    }
                    store
                        .ack_through(name.as_bytes(), page.last().unwrap().id)
                        .unwrap();
                    received
                        .lock()
                        .unwrap()
                        .extend(page.into_iter().map(|m| m.payload));
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for c in consumers {
        c.join().unwrap();
    }
    let got = received.lock().unwrap();
    let unique: HashSet<&Vec<u8>> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "a message was delivered twice");
    assert_eq!(got.len(), PRODUCERS * PER, "messages lost");
    for q in 0..QUEUES {
        assert_eq!(store.len(format!("q{q}").as_bytes()).unwrap(), 0);
    }
}

#[test]
fn group_commit() {
    run(Durability::default());
}

#[test]
fn asynchronous() {
    run(Durability::Async);
}

#[test]
fn synchronous() {
    run(Durability::Sync);
}

/// With a 100 ms shred deadline the compactor copies partly acked segments while the
/// producers and consumers run.
#[test]
fn with_compaction_running() {
    run_with(Durability::default(), Duration::from_millis(100));
}

/// Batches larger than the writer's backlog limit (64 MiB), from several threads into
/// the same segment: a thread holding reservations it has not submitted yet must never
/// wait for the writer (which writes in offset order and would wait on its hole). A
/// deadlock here fails the test (the watchdog ends the process) instead of hanging CI.
#[test]
fn huge_batches_from_several_threads_do_not_deadlock() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut o = Options::new(key);
    o.durability = Durability::Async;
    o.segment_size = 1 << 30;
    o.max_queue_len = u64::MAX;
    o.max_queue_bytes = u64::MAX;
    let store = Arc::new(Store::open(tmp.path().join("data"), o).unwrap());
    let payload = vec![7u8; 256 << 10];
    let finished = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let finished = Arc::clone(&finished);
        std::thread::spawn(move || {
            for _ in 0..600 {
                if finished.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // The appending threads never return: end the whole test process.
            eprintln!("append_batch deadlocked");
            std::process::exit(101);
        })
    };
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (store, payload) = (Arc::clone(&store), payload.clone());
            std::thread::spawn(move || {
                let q = format!("q{t}");
                for _ in 0..2 {
                    let batch: Vec<cinder::NewMessage<'_>> = (0..300)
                        .map(|_| cinder::NewMessage {
                            queue: q.as_bytes(),
                            payload: &payload,
                            ttl: Duration::from_secs(600),
                        })
                        .collect();
                    assert_eq!(store.append_batch(&batch).unwrap().len(), 300);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    finished.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    for t in 0..3 {
        assert_eq!(store.len(format!("q{t}").as_bytes()).unwrap(), 600);
    }
}
