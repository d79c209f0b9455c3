//! `Store::subscribe`: a future woken by the append itself, with no thread per waiter,
//! driven here by a hand-made waker (no executor), so what is tested is the engine's part.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use cinder::{Durability, Error, FileKeyProvider, MessageId, Options, Store, Subscription};

const TTL: Duration = Duration::from_secs(600);

/// A waker that counts its wake-ups.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Counter {
    fn woken(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn poll(sub: &mut Subscription, w: &Arc<Counter>) -> Poll<cinder::Result<()>> {
    let waker = Waker::from(Arc::clone(w));
    Pin::new(sub).poll(&mut Context::from_waker(&waker))
}

fn open(dir: &std::path::Path, durability: Durability) -> Store {
    let key = Arc::new(FileKeyProvider::create(dir.join("key")).unwrap());
    let mut o = Options::new(key);
    o.durability = durability;
    o.segment_size = 256 << 10;
    o.max_message_size = 16 << 10;
    Store::open(dir.join("data"), o).unwrap()
}

#[test]
fn an_append_wakes_a_pending_subscription_and_the_cursor_decides_what_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), Durability::Sync);
    let w = Arc::new(Counter::default());
    let mut sub = store.subscribe(b"q", None).unwrap();
    assert!(poll(&mut sub, &w).is_pending());
    // Another queue's append is not this subscription's business.
    store.append(b"other", b"x", TTL).unwrap();
    assert_eq!(w.woken(), 0);
    let a = store.append(b"q", b"a", TTL).unwrap();
    assert_eq!(w.woken(), 1, "the append itself wakes the waker");
    assert!(matches!(poll(&mut sub, &w), Poll::Ready(Ok(()))));
    // Ready while the condition holds; after the cursor moves past `a`, pending again.
    assert!(matches!(poll(&mut sub, &w), Poll::Ready(Ok(()))));
    sub.set_after(Some(a));
    assert_eq!(sub.after(), Some(a));
    assert!(poll(&mut sub, &w).is_pending());
    store.append(b"q", b"b", TTL).unwrap();
    assert_eq!(w.woken(), 2);
    assert!(matches!(poll(&mut sub, &w), Poll::Ready(Ok(()))));
    // A subscription made when a message is already there is ready at once.
    let mut late = store.subscribe(b"q", Some(MessageId(0))).unwrap();
    assert!(late.is_ready());
    assert!(matches!(poll(&mut late, &w), Poll::Ready(Ok(()))));
    // Acked messages do not count.
    let mut sub = store.subscribe(b"q", None).unwrap();
    assert_eq!(store.ack_through(b"q", MessageId(u64::MAX - 1)).unwrap(), 2);
    assert!(poll(&mut sub, &w).is_pending());
}

#[test]
fn a_subscription_pins_its_queue_through_the_sweep_and_dropping_it_lets_go() {
    // Without the pin, the sweep drops the empty queue's entry, the next append makes a
    // new one, and the subscriber sleeps on the old entry forever.
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), Durability::Sync);
    let w = Arc::new(Counter::default());
    let mut sub = store.subscribe(b"idle", None).unwrap();
    assert!(poll(&mut sub, &w).is_pending());
    store.maintain().unwrap();
    assert_eq!(
        store.stats().queues,
        1,
        "a subscribed queue stays in the index"
    );
    store.append(b"idle", b"hello", TTL).unwrap();
    assert_eq!(w.woken(), 1);
    assert!(matches!(poll(&mut sub, &w), Poll::Ready(Ok(()))));
    store.purge(b"idle").unwrap();
    drop(sub);
    store.maintain().unwrap();
    assert_eq!(
        store.stats().queues,
        0,
        "a dropped subscription unpins its queue"
    );
}

#[test]
fn closing_the_store_resolves_every_subscription_with_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(
        tmp.path(),
        Durability::Group {
            max_delay: Duration::from_millis(2),
        },
    );
    let w = Arc::new(Counter::default());
    let mut subs: Vec<_> = (0..100)
        .map(|i| store.subscribe(format!("q{i}").as_bytes(), None).unwrap())
        .collect();
    for s in &mut subs {
        assert!(poll(s, &w).is_pending());
    }
    // A blocking waiter on another thread is released by the close too.
    let blocked = {
        let mut s = store.subscribe(b"q0", None).unwrap();
        std::thread::spawn(move || s.wait_until(Instant::now() + Duration::from_secs(300)))
    };
    std::thread::sleep(Duration::from_millis(50));
    store.close().unwrap();
    assert_eq!(w.woken(), 100);
    for s in &mut subs {
        assert!(matches!(poll(s, &w), Poll::Ready(Err(Error::Closed))));
    }
    assert!(matches!(blocked.join().unwrap(), Err(Error::Closed)));
    assert!(matches!(store.subscribe(b"q0", None), Err(Error::Closed)));
}

#[test]
fn the_blocking_wait_is_a_layer_over_the_subscription() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(open(
        tmp.path(),
        Durability::Group {
            max_delay: Duration::from_millis(2),
        },
    ));
    assert!(!store.wait(b"q", None, Duration::from_millis(20)).unwrap());
    let s = Arc::clone(&store);
    let waiter = std::thread::spawn(move || s.wait(b"q", None, Duration::MAX).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    store.append(b"q", b"x", TTL).unwrap();
    assert!(waiter.join().unwrap());
}

#[test]
fn many_pending_subscriptions_need_no_threads_and_each_is_woken_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), Durability::Async);
    let n = 20_000;
    let w = Arc::new(Counter::default());
    let mut subs: Vec<_> = (0..n)
        .map(|i| store.subscribe(format!("q{i}").as_bytes(), None).unwrap())
        .collect();
    let threads = || std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count);
    let before = threads();
    for s in &mut subs {
        assert!(poll(s, &w).is_pending());
    }
    assert_eq!(threads(), before, "pending subscriptions hold no thread");
    for i in (0..n).step_by(2) {
        store.append(format!("q{i}").as_bytes(), b"x", TTL).unwrap();
    }
    assert_eq!(w.woken(), n / 2);
    let ready = subs
        .iter_mut()
        .map(|s| poll(s, &w))
        .filter(Poll::is_ready)
        .count();
    assert_eq!(ready, n / 2);
}
