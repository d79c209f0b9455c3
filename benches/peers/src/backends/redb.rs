//! redb (pure-Rust copy-on-write B-tree), values sealed by the application.

use std::path::Path;
use std::sync::RwLock;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::aead::AppCipher;
use crate::backend::{parse_key, record_key, sample_of, Backend, Mode, Msg, Sample, R};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("msgs");

pub struct Redb {
    /// Write lock only for `compact`, which needs the database to itself.
    db: RwLock<Database>,
    mode: Mode,
    cipher: AppCipher,
}

impl Redb {
    pub fn open(dir: &Path, mode: Mode) -> R<Self> {
        let db = Database::create(dir.join("msgs.redb"))?;
        let w = db.begin_write()?;
        w.open_table(TABLE)?;
        w.commit()?;
        Ok(Redb {
            db: RwLock::new(db),
            mode,
            cipher: AppCipher::new(),
        })
    }

    fn write(&self, f: impl FnOnce(&mut redb::Table<'_, &[u8], &[u8]>) -> R<()>) -> R<()> {
        let db = self.db.read().expect("lock");
        let mut w = db.begin_write()?;
        w.set_durability(match self.mode {
            Mode::Sync => Durability::Immediate,
            Mode::NoSync => Durability::None,
        })?;
        {
            let mut t = w.open_table(TABLE)?;
            f(&mut t)?;
        }
        w.commit()?;
        Ok(())
    }
}

impl Backend for Redb {
    fn scan(&self, queue: u32, max: usize, f: &mut dyn FnMut(u64, &[u8])) -> R<usize> {
        let db = self.db.read().expect("lock");
        let r = db.begin_read()?;
        let t = r.open_table(TABLE)?;
        let (lo, hi) = (record_key(queue, 0), record_key(queue + 1, 0));
        let mut n = 0;
        for kv in t.range::<&[u8]>(&lo[..]..&hi[..])? {
            if n == max {
                break;
            }
            let (k, v) = kv?;
            let mut v = v.value().to_vec();
            let (_, seq) = parse_key(k.value())?;
            f(seq, self.cipher.open(k.value(), &mut v)?);
            n += 1;
        }
        Ok(n)
    }

    fn put(&self, batch: &[Msg<'_>]) -> R<Vec<u64>> {
        self.write(|t| {
            for m in batch {
                let k = record_key(m.queue, m.seq);
                t.insert(&k[..], &self.cipher.seal(&k, m.payload)[..])?;
            }
            Ok(())
        })?;
        Ok(batch.iter().map(|m| m.seq).collect())
    }

    fn delete(&self, batch: &[(u32, u64)]) -> R<()> {
        self.write(|t| {
            for &(q, s) in batch {
                t.remove(&record_key(q, s)[..])?;
            }
            Ok(())
        })
    }

    fn settle(&self) -> R<String> {
        // A durable commit first: compact refuses while a non-durable commit is pending.
        let db = self.db.read().expect("lock");
        let mut w = db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        w.commit()?;
        drop(db);
        let mut db = self.db.write().expect("lock");
        let mut passes = 0;
        while db.compact()? {
            passes += 1;
        }
        Ok(format!("durable commit + compact() x{}", passes + 1))
    }

    fn samples(&self, every: usize) -> R<Vec<Sample>> {
        let db = self.db.read().expect("lock");
        let r = db.begin_read()?;
        let t = r.open_table(TABLE)?;
        let mut out = Vec::new();
        for (i, kv) in t.iter()?.enumerate() {
            let (_, v) = kv?;
            if i.is_multiple_of(every) {
                out.extend(sample_of(v.value()));
            }
        }
        Ok(out)
    }

    fn deleted_key_exists(&self) -> R<bool> {
        Ok(true)
    }
}
