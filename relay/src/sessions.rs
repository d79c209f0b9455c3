//! Who holds a WebSocket session on which queue: at most `--sessions-per-queue` live
//! sessions per queue (default one); a new authenticated session displaces the oldest,
//! as a device reconnecting after a network change replaces its stale connection.
//!
//! The registry is the only owner of this state; a session holds a [`Registration`] that
//! removes itself when dropped, and a receiver that fires when it has been displaced.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// One queue's live sessions, oldest first.
type Live = Vec<(u64, oneshot::Sender<()>)>;

#[derive(Debug)]
pub struct Sessions {
    per_queue: usize,
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    queues: HashMap<Arc<str>, Live>,
}

/// A live session's place in the registry; dropping it frees the place.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    queue: Arc<str>,
    id: u64,
}

impl Sessions {
    /// `per_queue` is at least 1 (the flag is checked at start).
    pub fn new(per_queue: usize) -> Self {
        Sessions {
            per_queue: per_queue.max(1),
            inner: Mutex::default(),
        }
    }

    /// Registers a new session on `queue`, displacing the oldest ones beyond the limit.
    /// Returns the registration and the receiver that fires if this session is displaced
    /// in turn.
    pub fn register(
        self: &Arc<Self>,
        queue: &Arc<str>,
    ) -> (Registration, oneshot::Receiver<()>, usize) {
        let (tx, rx) = oneshot::channel();
        let mut r = self.inner.lock();
        r.next += 1;
        let id = r.next;
        let live = r.queues.entry(Arc::clone(queue)).or_default();
        let mut displaced = 0;
        while live.len() >= self.per_queue {
            let (_, old) = live.remove(0);
            // The old session may be ending on its own already: nothing to tell it then.
            let _ = old.send(());
            displaced += 1;
        }
        live.push((id, tx));
        drop(r);
        let reg = Registration {
            sessions: Arc::clone(self),
            queue: Arc::clone(queue),
            id,
        };
        (reg, rx, displaced)
    }

    /// Live sessions on `queue` (for tests and stats).
    #[cfg(test)]
    fn live(&self, queue: &str) -> usize {
        self.inner.lock().queues.get(queue).map_or(0, Vec::len)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut r = self.sessions.inner.lock();
        if let Some(live) = r.queues.get_mut(&self.queue) {
            live.retain(|(id, _)| *id != self.id);
            if live.is_empty() {
                r.queues.remove(&self.queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_sessions_stay_and_the_oldest_are_told() {
        let reg = Arc::new(Sessions::new(2));
        let queue: Arc<str> = "q".into();
        let (first, mut first_rx, displaced) = reg.register(&queue);
        assert_eq!(displaced, 0);
        let (_second, mut second_rx, _) = reg.register(&queue);
        assert!(first_rx.try_recv().is_err());
        let (third, _third_rx, displaced) = reg.register(&queue);
        assert_eq!(displaced, 1);
        assert!(first_rx.try_recv().is_ok(), "the oldest is displaced");
        assert!(second_rx.try_recv().is_err());
        assert_eq!(reg.live("q"), 2);
        // A displaced session's registration is already gone: dropping it is harmless.
        drop(first);
        assert_eq!(reg.live("q"), 2);
        drop(third);
        assert_eq!(reg.live("q"), 1);
        // Other queues are separate.
        let (_other, mut other_rx, _) = reg.register(&"other".into());
        assert!(other_rx.try_recv().is_err());
        assert_eq!(reg.live("q"), 1);
    }

    #[test]
    fn an_empty_queue_leaves_the_registry() {
        let reg = Arc::new(Sessions::new(1));
        let queue: Arc<str> = "q".into();
        let (first, _, _) = reg.register(&queue);
        let (second, _, displaced) = reg.register(&queue);
        assert_eq!(displaced, 1);
        drop(first);
        drop(second);
        assert!(reg.inner.lock().queues.is_empty());
    }
}
