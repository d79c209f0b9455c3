//! Waiting for new messages without a thread per waiter: [`Subscription`].
//!
//! Each queue in the index carries an [`Event`](event_listener::Event): a list of
//! listeners, each a heap node holding one waker (async) or one parked thread (blocking).
//! An append notifies it after the message becomes readable; a waiter re-checks its queue
//! after registering, so a notification between its check and its registration is never
//! lost. A subscription pins its queue's index entry (the sweep keeps queues that have
//! waiters), so appends and the subscription always meet on the same entry.
//!
//! Why a crate: `event-listener` (smol-rs) is exactly this list — intrusive, lock-light,
//! runtime-agnostic, with both `.await` and a blocking wait on one registration — and its
//! unsafe pointer work is better kept in a widely used crate than re-derived here. What is
//! the engine's own (when a queue is readable, pinning the entry, close) stays here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use event_listener::{EventListener, Listener};

use crate::error::{Error, Result};
use crate::index::QueueCell;
use crate::store::{Inner, MessageId};

/// A registration to be woken when a queue has a readable message after a cursor.
///
/// Made by [`Store::subscribe`](crate::Store::subscribe). It is a [`Future`] that resolves
/// with `Ok(())` as soon as the queue holds a readable message with an id greater than
/// the cursor (at once if one is already there), or with [`Error::Closed`] when the
/// store closes. It works with any executor: it only stores the task's waker, which an
/// append wakes. A pending subscription costs a few hundred bytes of memory and no
/// thread; dropping it cancels it. After it resolves it can be polled again (it resolves
/// again while the condition holds); move the cursor with [`Subscription::set_after`].
///
/// While a subscription exists its queue stays in the index, even when empty.
pub struct Subscription {
    inner: Arc<Inner>,
    cell: Arc<QueueCell>,
    after: Option<u64>,
    listener: Option<EventListener>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the queue id: it is metadata the engine keeps out of logs.
        f.debug_struct("Subscription")
            .field("after", &self.after)
            .field("listening", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Registers on `queue`'s index entry (creating it), pinning it there.
    pub(crate) fn new(inner: Arc<Inner>, queue: &[u8], after: Option<MessageId>) -> Self {
        let cell = loop {
            let q = inner.index.get_or_create(queue);
            let mut st = q.state.lock();
            if st.removed {
                // Swept between the lookup and the lock: look it up again.
                continue;
            }
            st.waiters += 1;
            drop(st);
            break q;
        };
        Subscription {
            inner,
            cell,
            after: after.map(|a| a.0),
            listener: None,
        }
    }

    /// Moves the cursor: the subscription now waits for a message after `after`.
    pub fn set_after(&mut self, after: Option<MessageId>) {
        self.after = after.map(|a| a.0);
    }

    /// The cursor.
    pub fn after(&self) -> Option<MessageId> {
        self.after.map(MessageId)
    }

    /// Whether a readable message is after the cursor now.
    pub fn is_ready(&self) -> bool {
        self.cell
            .state
            .lock()
            .has_readable(self.after, self.inner.now_ms())
    }

    /// `Some` when waiting is over: a message is there, or the store closed.
    fn check(&self) -> Option<Result<()>> {
        if self.inner.is_closed() {
            return Some(Err(Error::Closed));
        }
        self.is_ready().then_some(Ok(()))
    }

    /// Blocks the calling thread until a message is after the cursor (`Ok(true)`), until
    /// `deadline` (`Ok(false)`), or until the store closes (`Err(Closed)`).
    pub fn wait_until(&mut self, deadline: Instant) -> Result<bool> {
        loop {
            if let Some(r) = self.check() {
                self.listener = None;
                return r.map(|()| true);
            }
            match self.listener.take() {
                // Registered: check once more before sleeping (the event may have fired
                // between the check above and the registration).
                None => {
                    #[cfg(test)]
                    tests::between_check_and_listen();
                    self.listener = Some(self.cell.event.listen());
                }
                Some(l) => {
                    if l.wait_deadline(deadline).is_none() {
                        return match self.check() {
                            Some(r) => r.map(|()| true),
                            None => Ok(false),
                        };
                    }
                }
            }
        }
    }
}

impl Future for Subscription {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.check() {
                this.listener = None;
                return Poll::Ready(r);
            }
            match &mut this.listener {
                // See `wait_until`: register, then check again before waiting.
                None => {
                    #[cfg(test)]
                    tests::between_check_and_listen();
                    this.listener = Some(this.cell.event.listen());
                }
                Some(l) => match Pin::new(l).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.listener = None,
                },
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cell.state.lock().waiters -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    use crate::{FileKeyProvider, Options, Store};

    thread_local! {
        /// Runs once in the window between a subscription's check and its registration.
        static HOOK: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    pub(super) fn between_check_and_listen() {
        if let Some(f) = HOOK.with(|h| h.borrow_mut().take()) {
            f();
        }
    }

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        let store = Arc::new(Store::open(tmp.path().join("data"), Options::new(key)).unwrap());
        (tmp, store)
    }

    fn append_in_the_window(store: &Arc<Store>) {
        let s = Arc::clone(store);
        HOOK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                s.append(b"q", b"m", Duration::from_secs(60)).unwrap();
            }));
        });
    }

    /// The forced interleaving: the append (and its notification, with nobody listening
    /// yet) lands after the check found nothing. Without the second check the future
    /// would sleep until some later append.
    #[test]
    fn an_append_between_the_check_and_the_registration_is_not_missed() {
        let (_tmp, store) = store();
        let mut sub = store.subscribe(b"q", None).unwrap();
        append_in_the_window(&store);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            Pin::new(&mut sub).poll(&mut cx),
            Poll::Ready(Ok(()))
        ));

        let mut sub = store
            .subscribe(
                b"q",
                store.read(b"q", None, 1).unwrap().first().map(|m| m.id),
            )
            .unwrap();
        append_in_the_window(&store);
        // Blocking: without the second check this sleeps to the deadline.
        assert!(sub
            .wait_until(Instant::now() + Duration::from_secs(3600))
            .unwrap());
    }
}
