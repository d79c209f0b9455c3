//! Compaction: copy the live messages of a partly dead segment into a survivor segment
//! under a new key, switch the index to the copies, and let the reaper shred the old
//! segment. This is what bounds how long an acked or expired message stays decryptable
//! when its neighbours are still alive.
//!
//! Hot paths are never blocked: the compactor holds a queue lock only for the pointer
//! swap of one message (no I/O, no cryptography under it), and the writer's state lock
//! only for a reservation, like any appender.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::deadline::Deadline;
use crate::error::{CorruptionKind, Error, Result};
use crate::format::frame::{FrameHeader, MessageMeta};
use crate::index::dedupe::ClientId;
use crate::segment::codec::{self, Opened};
use crate::segment::scan::{self, Content};
use crate::segment::Segment;
use crate::store::Inner;
use crate::writer::Bucket;

/// Generation of compaction survivors (appends are generation 0).
const SURVIVORS: u8 = 1;

/// Compacts every segment that is due; returns (segments compacted, bytes copied).
pub fn compact_due(inner: &Inner) -> Result<(usize, u64)> {
    if !inner.opts.compaction {
        return Ok((0, 0));
    }
    let now = inner.now_ms();
    let mut done = (0, 0);
    let mut first_err = None;
    for seg in candidates(inner, now) {
        if seg.compacting.swap(true, Ordering::SeqCst) {
            continue;
        }
        let r = compact_one(inner, &seg, now);
        match r {
            Ok(bytes) => {
                seg.compact_failures.store(0, Ordering::SeqCst);
                seg.compacting.store(false, Ordering::SeqCst);
                done.0 += 1;
                done.1 += bytes;
            }
            // A record that does not open makes the segment uncompactable for good
            // (reported; its other records keep their deadline only by shredding the
            // whole segment once they die). Anything else may pass (a full disk, the key
            // provider, the writer's backlog): retried with backoff, so a transient fault
            // costs a few seconds of the deadline, not the deadline.
            Err(e) => {
                if matches!(e, Error::Corruption { .. }) {
                    seg.uncompactable.store(true, Ordering::SeqCst);
                } else {
                    let n = seg.compact_failures.fetch_add(1, Ordering::SeqCst) + 1;
                    let wait = Deadline::new(inner.opts.max_shred_delay).retry_backoff_ms(n);
                    seg.compact_retry_at_ms.store(now + wait, Ordering::SeqCst);
                    inner.count_compaction_retry();
                }
                seg.compacting.store(false, Ordering::SeqCst);
                first_err.get_or_insert(e);
            }
        }
    }
    if done.0 > 0 {
        inner.reaper.poke();
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// When the next compaction falls due (ms since the epoch), for the compactor's sleep.
pub fn next_due_ms(inner: &Inner, now: u64) -> Option<u64> {
    let d = Deadline::new(inner.opts.max_shred_delay);
    inner
        .segments
        .all()
        .iter()
        .filter(|s| has_dead_and_live(s) && !s.uncompactable.load(Ordering::SeqCst))
        .filter_map(|s| {
            let due =
                s.first_death_ms(now).or_else(|| upcoming_expiry(s))? + d.compaction_due_after_ms();
            Some(due.max(s.compact_retry_at_ms.load(Ordering::SeqCst)))
        })
        .min()
}

fn upcoming_expiry(s: &Segment) -> Option<u64> {
    let e = s.min_expiry_ms.load(Ordering::SeqCst);
    (e != u64::MAX).then_some(e)
}

fn has_dead_and_live(s: &Segment) -> bool {
    let live = s.live.load(Ordering::SeqCst);
    live > 0 && s.records.load(Ordering::SeqCst) > live
}

/// Closed segments holding both live and dead messages whose deadline is near (security)
/// or that are mostly dead and no longer being acked through (space), oldest death first.
fn candidates(inner: &Inner, now: u64) -> Vec<Arc<Segment>> {
    let d = Deadline::new(inner.opts.max_shred_delay);
    let active: std::collections::HashSet<u64> = inner.writer.active_ids().into_iter().collect();
    let mut v: Vec<(u64, Arc<Segment>)> = inner
        .segments
        .all()
        .into_iter()
        .filter(|s| {
            !s.uncompactable.load(Ordering::SeqCst)
                && s.compact_retry_at_ms.load(Ordering::SeqCst) <= now
        })
        .filter(|s| {
            s.closed.load(Ordering::SeqCst) && !active.contains(&s.id) && has_dead_and_live(s)
        })
        .filter_map(|s| {
            let death = s.first_death_ms(now)?;
            let live = s.live.load(Ordering::SeqCst);
            let settled = now.saturating_sub(s.last_ack_ms.load(Ordering::SeqCst)) >= d.settle_ms();
            let mostly_dead = live * 4 < s.records.load(Ordering::SeqCst) && settled;
            (death + d.compaction_due_after_ms() <= now || mostly_dead).then_some((death, s))
        })
        .collect();
    v.sort_by_key(|(death, s)| (*death, s.id));
    v.into_iter().map(|(_, s)| s).collect()
}

/// A live message found in the segment being compacted.
struct Live {
    queue: Vec<u8>,
    id: u64,
    created_at_ms: u64,
    expires_at_ms: u64,
    off: u64,
    len: u32,
    client_id: Option<ClientId>,
}

/// A copy written to a survivor segment.
struct Copy {
    queue: Vec<u8>,
    id: u64,
    from_off: u64,
    to: Arc<Segment>,
    to_off: u64,
    len: u64,
    client_id: Option<ClientId>,
}

fn compact_one(inner: &Inner, seg: &Arc<Segment>, now: u64) -> Result<u64> {
    let live = live_messages(inner, seg, now)?;
    let mut copies = Vec::with_capacity(live.len());
    if let Err(e) = copy_out(inner, seg, live, now, &mut copies) {
        // The copies made so far are never switched to: count them dead so they are
        // shredded with their segment, not kept (or made again) forever.
        for c in &copies {
            let still_live = inner.index.get(&c.queue).is_some_and(|q| {
                q.state
                    .lock()
                    .slot(c.id)
                    .is_some_and(|s| s.seg == seg.id && u64::from(s.off) == c.from_off)
            });
            // A later ack of a message still live protects the copy too (the copy link);
            // one that died meanwhile may have been acked before the link existed.
            abandon(inner, seg, c, now, still_live);
        }
        return Err(e);
    }
    switch_over(inner, seg, copies, now)
}

/// Counts a copy that will never be switched to dead. If its message died while it was
/// being copied, the message's ack record may have been applied before the survivor
/// was linked as a copy of `seg`, so it protects only `seg`: every ack segment that
/// protects `seg` now protects the survivor too (in memory, nothing to write, nothing to
/// fail), until the survivor is shredded. Recovery links every copy of an acked id to
/// its ack segment by itself.
fn abandon(inner: &Inner, seg: &Segment, c: &Copy, now: u64, message_live: bool) {
    c.to.dec_live(1);
    c.to.mark_acked(now);
    if message_live {
        return;
    }
    let sources: Vec<u64> = seg.links.lock().ack_sources.iter().copied().collect();
    for a in sources.into_iter().filter(|&a| a != c.to.id) {
        if let Some(a) = inner.segments.get(a) {
            a.links.lock().ack_targets.insert(c.to.id);
            c.to.links.lock().ack_sources.insert(a.id);
        }
    }
}

/// Links `a` and `b` as holding copies of the same messages: an ack applied to either
/// protects both. Direct links only: a survivor receives copies from many originals
/// over its life, and a group closed under linking would spread to most live segments
/// and pin every ack segment as long as the longest-lived of them.
fn link_copies(a: &Segment, b: &Segment) {
    a.links.lock().copies.insert(b.id);
    b.links.lock().copies.insert(a.id);
}

/// Decrypts each live message and writes its copy; `copies` holds what was written.
fn copy_out(
    inner: &Inner,
    seg: &Segment,
    live: Vec<Live>,
    now: u64,
    copies: &mut Vec<Copy>,
) -> Result<()> {
    for m in live {
        let (payload, padded_to) = open_payload(seg, &m)?;
        let bucket = Bucket::for_message(
            SURVIVORS,
            m.expires_at_ms.saturating_sub(m.created_at_ms),
            m.expires_at_ms,
            inner.opts.max_shred_delay.as_millis() as u64,
        );
        let r = inner
            .writer
            .reserve(bucket, u64::from(m.len), (m.expires_at_ms, now), false)?;
        // Before the copy can be durable: from here on, an ack of any record of `seg`
        // also protects the survivor (and the reverse), whatever becomes of the copy.
        if r.seg.id != seg.id && !seg.links.lock().copies.contains(&r.seg.id) {
            link_copies(seg, &r.seg);
        }
        let meta = MessageMeta {
            id: m.id,
            created_at_ms: m.created_at_ms,
            expires_at_ms: m.expires_at_ms,
            payload_len: payload.len() as u32,
            queue: &m.queue,
            // Kept: the copy is the message's record now (and is as long as the original).
            client_id: m.client_id,
        };
        // A fresh key and a fresh offset: the copy never shares a key stream with the
        // original (the JetStream re-encryption pitfall).
        let frame = codec::seal_message(&r.seg.key, r.seg.id, r.offset, &meta, &payload, padded_to);
        inner.writer.submit(&r, frame);
        copies.push(Copy {
            queue: m.queue,
            id: m.id,
            from_off: m.off,
            to: r.seg,
            to_off: r.offset,
            len: r.len,
            client_id: m.client_id,
        });
    }
    Ok(())
}

/// Waits for the copies to be durable, then points the index at them.
fn switch_over(inner: &Inner, seg: &Segment, copies: Vec<Copy>, now: u64) -> Result<u64> {
    // Copies durable before any pointer moves: a crash now leaves both copies, and
    // recovery keeps the newer one.
    let mut ends: HashMap<u64, (Arc<Segment>, u64)> = HashMap::new();
    for c in &copies {
        let e = ends
            .entry(c.to.id)
            .or_insert_with(|| (Arc::clone(&c.to), 0));
        e.1 = e.1.max(c.to_off + c.len);
    }
    for (s, end) in ends.values() {
        inner.writer.wait_durable_always(s, *end)?;
    }
    let mut moved = 0;
    let mut bytes = 0;
    // After a failed attempt, other survivors may hold abandoned copies of the messages
    // now moving: link them with the segments the messages move to, so an ack of a
    // moved message protects those copies too.
    let earlier: Vec<u64> = if seg.compact_failures.load(Ordering::SeqCst) > 0 {
        seg.links.lock().copies.iter().copied().collect()
    } else {
        Vec::new()
    };
    let mut linked = std::collections::HashSet::new();
    for c in copies {
        if !earlier.is_empty() && linked.insert(c.to.id) {
            for x in earlier.iter().filter_map(|&x| inner.segments.get(x)) {
                if x.id != c.to.id {
                    link_copies(&x, &c.to);
                }
            }
        }
        let swapped = inner.index.get(&c.queue).is_some_and(|q| {
            // The survivor learns of the client id before the move can be seen (see
            // Store::finish); unused if the move does not happen.
            if let Some(cid) = c.client_id {
                inner
                    .index
                    .dedupe_refs
                    .add(c.to.id, Arc::downgrade(&q), cid);
            }
            let mut st = q.state.lock();
            let swapped = st.relocate(c.id, (seg.id, c.from_off), (c.to.id, c.to_off));
            // The client id's record moves with the message.
            if let Some(cid) = c.client_id.filter(|_| swapped) {
                st.dedupe.moved(&cid, c.id, seg.id, c.to.id);
            }
            swapped
        });
        if swapped {
            moved += 1;
        } else {
            // Acked, purged or expired while being copied: the copy is dead on arrival.
            abandon(inner, seg, &c, now, false);
        }
        bytes += c.len;
    }
    seg.dec_live(moved);
    inner.bytes_copied.fetch_add(bytes, Ordering::SeqCst);
    Ok(bytes)
}

/// The messages of `seg` that the index still points at. Expired ones met on the way are
/// removed from the index instead of being copied.
fn live_messages(inner: &Inner, seg: &Segment, now: u64) -> Result<Vec<Live>> {
    let Some(bytes) = seg.mapped() else {
        return Ok(Vec::new());
    };
    let walk = scan::scan(bytes, seg.id, Some(&seg.key), false);
    if let Some((off, kind)) = walk.auth_failures.first() {
        return Err(Error::corruption(&seg.path, *off, kind.clone()));
    }
    let mut out = Vec::new();
    let mut expired = Vec::new();
    for f in &walk.frames {
        let Content::Message {
            id,
            created_at_ms,
            expires_at_ms,
            queue,
            client_id,
            ..
        } = &f.content
        else {
            continue;
        };
        let Some(q) = inner.index.get(queue) else {
            continue;
        };
        let mut st = q.state.lock();
        let Some(slot) = st.slot(*id) else { continue };
        if slot.seg != seg.id || u64::from(slot.off) != f.offset {
            continue;
        }
        if *expires_at_ms <= now {
            if let Some(crate::index::Removed::Expired(s)) = st.take(*id, now) {
                expired.push(s);
            }
            continue;
        }
        out.push(Live {
            queue: queue.clone(),
            id: *id,
            created_at_ms: *created_at_ms,
            expires_at_ms: *expires_at_ms,
            off: f.offset,
            len: f.len,
            client_id: *client_id,
        });
    }
    inner.drop_expired(&expired);
    Ok(out)
}

/// The payload of a live message, and its body's padded length if it is padded (the copy
/// keeps the original's frame length, which its reservation was made for).
fn open_payload(seg: &Segment, m: &Live) -> Result<(Zeroizing<Vec<u8>>, Option<usize>)> {
    // The frame is decrypted in place: wiped when dropped, whatever happens.
    let mut frame = Zeroizing::new(seg.read_at(m.off, m.len as usize)?);
    let h = FrameHeader::decode(&frame).map_err(|e| e.into_error(&seg.path, m.off))?;
    match codec::open_frame(&seg.key, seg.id, m.off, h, &mut frame)
        .map_err(|e| e.into_error(&seg.path, m.off))?
    {
        Opened::Message { id, .. } if id == m.id => {}
        _ => {
            return Err(Error::corruption(
                &seg.path,
                m.off,
                CorruptionKind::AuthenticationFailed,
            ))
        }
    }
    let r = codec::open_body(&seg.key, seg.id, m.off, h, &mut frame)
        .map_err(|e| e.into_error(&seg.path, m.off))?;
    frame.truncate(r.end);
    frame.drain(..r.start);
    let padded_to = h
        .padded
        .then(|| h.body_len as usize - crate::crypto::TAG_LEN);
    Ok((frame, padded_to))
}
