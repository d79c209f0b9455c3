//! RocksDB (rust-rocksdb, bundled C++ library), values sealed by the application.

use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use crate::aead::AppCipher;
use crate::backend::{parse_key, record_key, sample_of, Backend, Mode, Msg, Sample, R};

pub struct Rocks {
    db: DB,
    wo: WriteOptions,
    cipher: AppCipher,
}

impl Rocks {
    pub fn open(dir: &Path, mode: Mode) -> R<Self> {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.increase_parallelism(2);
        let mut wo = WriteOptions::default();
        wo.set_sync(mode == Mode::Sync);
        Ok(Rocks {
            db: DB::open(&o, dir)?,
            wo,
            cipher: AppCipher::new(),
        })
    }
}

impl Backend for Rocks {
    fn scan(&self, queue: u32, max: usize, f: &mut dyn FnMut(u64, &[u8])) -> R<usize> {
        let start = record_key(queue, 0);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(record_key(queue + 1, 0).to_vec());
        let mut n = 0;
        for kv in self
            .db
            .iterator_opt(IteratorMode::From(&start, Direction::Forward), ro)
        {
            if n == max {
                break;
            }
            let (k, v) = kv?;
            let mut v = v.into_vec();
            let (_, seq) = parse_key(&k)?;
            f(seq, self.cipher.open(&k, &mut v)?);
            n += 1;
        }
        Ok(n)
    }

    fn put(&self, batch: &[Msg<'_>]) -> R<Vec<u64>> {
        let mut wb = WriteBatch::default();
        for m in batch {
            let k = record_key(m.queue, m.seq);
            wb.put(k, self.cipher.seal(&k, m.payload));
        }
        self.db.write_opt(wb, &self.wo)?;
        Ok(batch.iter().map(|m| m.seq).collect())
    }

    fn delete(&self, batch: &[(u32, u64)]) -> R<()> {
        let mut wb = WriteBatch::default();
        for &(q, s) in batch {
            wb.delete(record_key(q, s));
        }
        self.db.write_opt(wb, &self.wo)?;
        Ok(())
    }

    fn settle(&self) -> R<String> {
        self.db.flush()?;
        self.db.compact_range(None::<&[u8]>, None::<&[u8]>);
        self.db.flush_wal(true)?;
        Ok("flush + compact_range(all)".into())
    }

    fn samples(&self, every: usize) -> R<Vec<Sample>> {
        let mut out = Vec::new();
        for (i, kv) in self.db.iterator(IteratorMode::Start).enumerate() {
            let (_, v) = kv?;
            if i.is_multiple_of(every) {
                out.extend(sample_of(&v));
            }
        }
        Ok(out)
    }

    fn deleted_key_exists(&self) -> R<bool> {
        // The one application key opens every record ever written.
        Ok(true)
    }
}
