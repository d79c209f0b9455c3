//! fjall (pure-Rust LSM tree), values sealed by the application.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::aead::AppCipher;
use crate::backend::{parse_key, record_key, sample_of, Backend, Mode, Msg, Sample, R};

pub struct Fjall {
    db: Database,
    ks: Keyspace,
    mode: Mode,
    cipher: AppCipher,
}

impl Fjall {
    pub fn open(dir: &Path, mode: Mode) -> R<Self> {
        // Persistence is driven by hand: SyncData per commit in Sync mode, none otherwise.
        let db = Database::builder(dir).manual_journal_persist(true).open()?;
        let ks = db.keyspace("msgs", KeyspaceCreateOptions::default)?;
        Ok(Fjall {
            db,
            ks,
            mode,
            cipher: AppCipher::new(),
        })
    }

    fn commit(&self, b: fjall::OwnedWriteBatch) -> R<()> {
        let b = b.durability(match self.mode {
            Mode::Sync => Some(PersistMode::SyncData),
            Mode::NoSync => None,
        });
        b.commit()?;
        Ok(())
    }
}

impl Backend for Fjall {
    fn scan(&self, queue: u32, max: usize, f: &mut dyn FnMut(u64, &[u8])) -> R<usize> {
        let mut n = 0;
        for g in self.ks.prefix(queue.to_be_bytes()) {
            if n == max {
                break;
            }
            let (k, v) = g.into_inner()?;
            let mut v = v.to_vec();
            let (_, seq) = parse_key(&k)?;
            f(seq, self.cipher.open(&k, &mut v)?);
            n += 1;
        }
        Ok(n)
    }

    fn put(&self, batch: &[Msg<'_>]) -> R<Vec<u64>> {
        let mut b = self.db.batch();
        for m in batch {
            let k = record_key(m.queue, m.seq);
            b.insert(&self.ks, k, self.cipher.seal(&k, m.payload));
        }
        self.commit(b)?;
        Ok(batch.iter().map(|m| m.seq).collect())
    }

    fn delete(&self, batch: &[(u32, u64)]) -> R<()> {
        let mut b = self.db.batch();
        for &(q, s) in batch {
            b.remove(&self.ks, record_key(q, s));
        }
        self.commit(b)
    }

    fn settle(&self) -> R<String> {
        self.ks.rotate_memtable_and_wait()?;
        self.ks.major_compact()?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok("rotate_memtable_and_wait + major_compact + persist(SyncAll)".into())
    }

    fn samples(&self, every: usize) -> R<Vec<Sample>> {
        let mut out = Vec::new();
        for (i, g) in self.ks.iter().enumerate() {
            let v = g.value()?;
            if i.is_multiple_of(every) {
                out.extend(sample_of(&v));
            }
        }
        Ok(out)
    }

    fn deleted_key_exists(&self) -> R<bool> {
        Ok(true)
    }
}
