//! `Store::ack_batch_nowait`: the messages are gone from reads at once, the call waits for
//! no fsync, and the ack record still becomes durable by itself — with the writer's next
//! commit in `Group` mode (seen in a power-cut image taken through the I/O seam, with no
//! flush or other caller in between), and at `flush` in any mode. Before that, a power
//! cut may bring the messages back: at-least-once, as documented.

use std::time::{Duration, Instant};

mod common;

use cinder::vfs::CrashImage;
use cinder::{Durability, MessageId, Store};
use common::rig::Rig;

const TTL: Duration = Duration::from_secs(3600);

fn fill(store: &Store, n: usize) -> Vec<MessageId> {
    (0..n)
        .map(|i| store.append(b"q", format!("m{i}").as_bytes(), TTL).unwrap())
        .collect()
}

/// Messages of queue `q` in what a power cut now would leave.
fn after_power_cut(rig: &Rig, image: &CrashImage) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    image.write_to(&dir).unwrap();
    let store = Store::open(&dir, rig.real()).unwrap();
    let n = store.read(b"q", None, 1000).unwrap().len();
    store.close().unwrap();
    n
}

#[test]
fn in_group_mode_the_writer_makes_a_nowait_ack_durable_by_itself() {
    let rig = Rig::new(Durability::default(), Duration::from_secs(60));
    let store = Store::open(&rig.dir, rig.faulty()).unwrap();
    let ids = fill(&store, 10);
    assert_eq!(store.ack_batch_nowait(b"q", &ids[..4]).unwrap(), 4);
    // Gone from reads at once, and acking them again finds nothing.
    assert_eq!(store.read(b"q", None, 100).unwrap().len(), 6);
    assert_eq!(store.ack_batch_nowait(b"q", &ids[..4]).unwrap(), 0);
    // Nobody waits and nothing else is written: the writer's own round syncs the record.
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let left = after_power_cut(&rig, &rig.fs.crash_image());
        if left == 6 {
            break;
        }
        assert_eq!(left, 10, "a power cut left some of the acks only");
        assert!(
            Instant::now() < give_up,
            "the nowait acks never became durable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn in_async_mode_flush_makes_it_durable() {
    let rig = Rig::new(Durability::Async, Duration::from_secs(60));
    let mut o = rig.faulty();
    o.async_sync_interval = Duration::from_secs(10);
    let store = Store::open(&rig.dir, o).unwrap();
    let ids = fill(&store, 10);
    store.flush().unwrap();
    assert_eq!(store.ack_batch_nowait(b"q", &ids[2..5]).unwrap(), 3);
    // Not synced yet (the interval is 10 s): a power cut brings them back.
    assert_eq!(after_power_cut(&rig, &rig.fs.crash_image()), 10);
    store.flush().unwrap();
    assert_eq!(after_power_cut(&rig, &rig.fs.crash_image()), 7);
}
