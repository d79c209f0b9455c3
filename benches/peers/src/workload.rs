//! The relay workload, identical for every backend: enqueue, drain, ack, settle; the
//! no-sync cycle; 32 concurrent writers; the steady mix.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::{dir_bytes, samples_found, Backend, Msg, R};

#[derive(Debug, Clone)]
pub struct Cfg {
    pub queues: u32,
    pub messages: usize,
    pub size: usize,
    /// Operations per commit (the peers' fsync interval).
    pub batch: usize,
    /// How many ciphertext samples to take before the deletes.
    pub samples: usize,
}

/// Random payloads, message `i` going to queue `i % queues` as its `i / queues`-th
/// message. Each payload starts with its (queue, seq) so that drains can check order.
pub struct Data {
    pub bytes: Vec<u8>,
    pub size: usize,
    pub queues: u32,
    pub n: usize,
}

impl Data {
    pub fn new(cfg: &Cfg) -> Self {
        let mut bytes = vec![0u8; cfg.messages * cfg.size];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for c in bytes.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        for i in 0..cfg.messages {
            let p = &mut bytes[i * cfg.size..];
            let (q, s) = Self::place_of(cfg.queues, i);
            p[..4].copy_from_slice(&q.to_le_bytes());
            p[4..12].copy_from_slice(&s.to_le_bytes());
        }
        Data {
            bytes,
            size: cfg.size,
            queues: cfg.queues,
            n: cfg.messages,
        }
    }

    fn place_of(queues: u32, i: usize) -> (u32, u64) {
        ((i % queues as usize) as u32, (i / queues as usize) as u64)
    }

    pub fn msg(&self, i: usize) -> Msg<'_> {
        let (queue, seq) = Self::place_of(self.queues, i);
        Msg {
            queue,
            seq,
            payload: &self.bytes[i * self.size..(i + 1) * self.size],
        }
    }

    fn per_queue(&self, q: u32) -> usize {
        (q as usize..self.n).step_by(self.queues as usize).count()
    }
}

/// Seconds each phase took, and what phase D found.
#[derive(Debug, Clone, Default)]
pub struct Cycle {
    pub enqueue: f64,
    pub drain: f64,
    pub ack: f64,
    /// Commits made in the enqueue and ack phases.
    pub enqueue_commits: usize,
    pub ack_commits: usize,
    pub after: Option<After>,
}

#[derive(Debug, Clone)]
pub struct After {
    pub settle_secs: f64,
    pub settle: String,
    pub bytes_on_disk: u64,
    /// Of which files still being written (see `Backend::active_bytes`).
    pub active_bytes: u64,
    pub samples: usize,
    pub samples_found: usize,
    pub key_exists: bool,
}

impl Cycle {
    pub fn total(&self) -> f64 {
        self.enqueue + self.drain + self.ack
    }
}

/// Phases A–C, and D when `settle` is set.
pub fn cycle(b: &dyn Backend, dir: &Path, data: &Data, cfg: &Cfg, settle: bool) -> R<Cycle> {
    let mut c = Cycle::default();
    // A: enqueue, `batch` messages per commit, round-robin over the queues.
    let mut handles = vec![0u64; data.n];
    let t = Instant::now();
    let mut batch = Vec::with_capacity(cfg.batch);
    for start in (0..data.n).step_by(cfg.batch) {
        batch.clear();
        batch.extend((start..(start + cfg.batch).min(data.n)).map(|i| data.msg(i)));
        let hs = b.put(&batch)?;
        handles[start..start + hs.len()].copy_from_slice(&hs);
        c.enqueue_commits += 1;
    }
    c.enqueue = t.elapsed().as_secs_f64();

    let samples = if settle {
        let every = (data.n / cfg.samples.max(1)).max(1);
        b.samples(every).map_err(|e| format!("samples: {e}"))?
    } else {
        Vec::new()
    };

    // B: drain every queue in FIFO order, decrypting, checking order and content.
    let t = Instant::now();
    for q in 0..data.queues {
        let mut next = 0u64;
        let mut bad = None;
        b.drain(q, &mut |_, p| {
            let i = next as usize * data.queues as usize + q as usize;
            if bad.is_none() && (i >= data.n || p != data.msg(i).payload) {
                bad = Some(next);
            }
            next += 1;
        })?;
        if let Some(at) = bad {
            return Err(format!("queue {q}: message {at} out of order or wrong").into());
        }
        if next as usize != data.per_queue(q) {
            return Err(format!("queue {q}: drained {next} of {}", data.per_queue(q)).into());
        }
    }
    c.drain = t.elapsed().as_secs_f64();

    // C: delete every message individually, queue by queue in FIFO order, committing
    // every `batch` deletes and at the end of each queue.
    let t = Instant::now();
    let mut del = Vec::with_capacity(cfg.batch);
    for q in 0..data.queues {
        let ids: Vec<(u32, u64)> = (q as usize..data.n)
            .step_by(data.queues as usize)
            .map(|i| (q, handles[i]))
            .collect();
        for chunk in ids.chunks(cfg.batch) {
            del.clear();
            del.extend_from_slice(chunk);
            b.delete(&del)?;
            c.ack_commits += 1;
        }
    }
    c.ack = t.elapsed().as_secs_f64();

    // D: settle, then look at what is left.
    if settle {
        for q in (0..data.queues).step_by(97) {
            let mut left = 0;
            b.drain(q, &mut |_, _| left += 1)?;
            if left != 0 {
                return Err(format!("queue {q}: {left} messages left after the acks").into());
            }
        }
        let t = Instant::now();
        let what = b.settle().map_err(|e| format!("settle: {e}"))?;
        let settle_secs = t.elapsed().as_secs_f64();
        c.after = Some(After {
            settle_secs,
            settle: what,
            bytes_on_disk: dir_bytes(dir)?,
            active_bytes: b.active_bytes()?,
            samples: samples.len(),
            samples_found: samples_found(dir, &samples)?,
            key_exists: b
                .deleted_key_exists()
                .map_err(|e| format!("key check: {e}"))?,
        });
    }
    Ok(c)
}

/// Runs `work(w, stop)` on `threads` threads for `secs`; each returns how many messages
/// it completed. Returns messages per second over all of them.
fn timed_threads(
    threads: usize,
    secs: f64,
    work: impl Fn(usize, &AtomicBool) -> R<u64> + Sync,
) -> R<f64> {
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let done = std::thread::scope(|s| -> R<u64> {
        let hs: Vec<_> = (0..threads)
            .map(|w| {
                let (stop, work) = (&stop, &work);
                s.spawn(move || work(w, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let mut done = 0;
        for h in hs {
            done += h.join().expect("worker panicked")?;
        }
        Ok(done)
    })?;
    Ok(done as f64 / t.elapsed().as_secs_f64())
}

/// `threads` writers, each appending one message per durable commit for `secs`.
/// Returns messages per second.
pub fn writers(b: &dyn Backend, data: &Data, threads: usize, secs: f64) -> R<f64> {
    timed_threads(threads, secs, |w, stop| {
        // Writer w writes queues w, w + threads, ... (mod queues), with seqs no other
        // writer uses.
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let q = ((w + i * threads) % data.queues as usize) as u32;
            b.put(&[Msg {
                queue: q,
                seq: (i * threads + w) as u64,
                payload: data.msg(i % data.n).payload,
            }])?;
            i += 1;
        }
        Ok(i as u64)
    })
}

/// The steady relay mix: each of `threads` workers owns its share of the queues and
/// loops over: enqueue `batch` messages (one commit), read the head of `batch` queues
/// (decrypting), delete those (one commit). The backlog stays at `prefill` messages per
/// queue. Returns messages per second through the whole cycle.
pub fn mixed(
    b: &dyn Backend,
    data: &Data,
    cfg: &Cfg,
    threads: usize,
    prefill: u64,
    secs: f64,
) -> R<f64> {
    let queues = data.queues as usize;
    // Prefill, untimed.
    let fill: Vec<Msg<'_>> = (0..queues * prefill as usize)
        .map(|i| Msg {
            queue: (i % queues) as u32,
            seq: (i / queues) as u64,
            payload: data.msg(i % data.n).payload,
        })
        .collect();
    for chunk in fill.chunks(cfg.batch) {
        b.put(chunk)?;
    }
    let share = queues.div_ceil(threads);
    timed_threads(threads, secs, |w, stop| {
        // Worker w owns queues [first, first + mine).
        let first = (w * share).min(queues);
        let mine = share.min(queues - first);
        if mine == 0 {
            return Ok(0);
        }
        let mut seqs = vec![prefill; mine];
        // Each unit touches distinct queues, so each head read finds a message not
        // yet in the unit's deletes.
        let unit = cfg.batch.min(mine);
        let (mut put_at, mut read_at, mut i, mut done) = (0usize, 0usize, 0usize, 0u64);
        let mut batch = Vec::with_capacity(unit);
        let mut del = Vec::with_capacity(unit);
        while !stop.load(Ordering::Relaxed) {
            batch.clear();
            for _ in 0..unit {
                let q = put_at % mine;
                put_at += 1;
                batch.push(Msg {
                    queue: (first + q) as u32,
                    seq: seqs[q],
                    payload: data.msg(i % data.n).payload,
                });
                seqs[q] += 1;
                i += 1;
            }
            b.put(&batch)?;
            del.clear();
            for _ in 0..unit {
                let q = (first + read_at % mine) as u32;
                read_at += 1;
                let mut h = None;
                b.head(q, &mut |id, p| {
                    std::hint::black_box(p);
                    h = Some(id);
                })?;
                del.push((q, h.ok_or_else(|| format!("queue {q} empty"))?));
            }
            // One commit of deletes; per-queue runs are length 1 here.
            b.delete(&del)?;
            done += unit as u64;
        }
        Ok(done)
    })
}

/// Phase A alone, over and over (new seqs each pass) for `secs`: (messages, seconds).
pub fn profile_enqueue(b: &dyn Backend, data: &Data, cfg: &Cfg, secs: f64) -> R<(usize, f64)> {
    let t = Instant::now();
    let mut done = 0;
    let mut batch = Vec::with_capacity(cfg.batch);
    for pass in 0u64.. {
        for start in (0..data.n).step_by(cfg.batch) {
            batch.clear();
            batch.extend((start..(start + cfg.batch).min(data.n)).map(|i| {
                let mut m = data.msg(i);
                m.seq += pass * data.n as u64;
                m
            }));
            b.put(&batch)?;
            done += batch.len();
        }
        if t.elapsed().as_secs_f64() >= secs {
            break;
        }
    }
    Ok((done, t.elapsed().as_secs_f64()))
}

/// Phase B alone: one fill, then drains of every queue until `secs` pass.
pub fn profile_drain(b: &dyn Backend, data: &Data, cfg: &Cfg, secs: f64) -> R<(usize, f64)> {
    for start in (0..data.n).step_by(cfg.batch) {
        let batch: Vec<Msg<'_>> = (start..(start + cfg.batch).min(data.n))
            .map(|i| data.msg(i))
            .collect();
        b.put(&batch)?;
    }
    let t = Instant::now();
    let mut done = 0;
    while t.elapsed().as_secs_f64() < secs {
        for q in 0..data.queues {
            b.drain(q, &mut |_, p| {
                std::hint::black_box(p);
                done += 1;
            })?;
        }
    }
    Ok((done, t.elapsed().as_secs_f64()))
}
