//! SQLite (bundled, WAL journal), values sealed by the application.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};

use crate::aead::AppCipher;
use crate::backend::{record_key, sample_of, Backend, Mode, Msg, Sample, R};

pub struct Sqlite {
    /// SQLite has one writer at a time; one connection behind a lock is its concurrent
    /// mode (more connections would only retry on SQLITE_BUSY).
    conn: Mutex<Connection>,
    cipher: AppCipher,
}

impl Sqlite {
    pub fn open(dir: &Path, mode: Mode) -> R<Self> {
        let conn = Connection::open(dir.join("msgs.sqlite"))?;
        // In WAL mode, synchronous=FULL fsyncs the WAL at every commit; OFF never does.
        let sync = match mode {
            Mode::Sync => "FULL",
            Mode::NoSync => "OFF",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};
             CREATE TABLE IF NOT EXISTS msgs (
                 queue INTEGER NOT NULL, seq INTEGER NOT NULL, v BLOB NOT NULL,
                 PRIMARY KEY (queue, seq)) WITHOUT ROWID;"
        ))?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            cipher: AppCipher::new(),
        })
    }
}

impl Backend for Sqlite {
    fn scan(&self, queue: u32, max: usize, f: &mut dyn FnMut(u64, &[u8])) -> R<usize> {
        let c = self.conn.lock().expect("lock");
        let mut st =
            c.prepare_cached("SELECT seq, v FROM msgs WHERE queue = ?1 ORDER BY seq LIMIT ?2")?;
        let mut rows = st.query(params![queue, max.min(i64::MAX as usize) as i64])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let mut v: Vec<u8> = row.get(1)?;
            let seq = seq as u64;
            f(seq, self.cipher.open(&record_key(queue, seq), &mut v)?);
            n += 1;
        }
        Ok(n)
    }

    fn put(&self, batch: &[Msg<'_>]) -> R<Vec<u64>> {
        let mut c = self.conn.lock().expect("lock");
        let tx = c.transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT INTO msgs (queue, seq, v) VALUES (?1, ?2, ?3)")?;
            for m in batch {
                let k = record_key(m.queue, m.seq);
                st.execute(params![
                    m.queue,
                    m.seq as i64,
                    self.cipher.seal(&k, m.payload)
                ])?;
            }
        }
        tx.commit()?;
        Ok(batch.iter().map(|m| m.seq).collect())
    }

    fn delete(&self, batch: &[(u32, u64)]) -> R<()> {
        let mut c = self.conn.lock().expect("lock");
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached("DELETE FROM msgs WHERE queue = ?1 AND seq = ?2")?;
            for &(q, s) in batch {
                st.execute(params![q, s as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn settle(&self) -> R<String> {
        let c = self.conn.lock().expect("lock");
        c.execute_batch(
            "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
        )?;
        Ok("wal_checkpoint(TRUNCATE) + VACUUM".into())
    }

    fn samples(&self, every: usize) -> R<Vec<Sample>> {
        let c = self.conn.lock().expect("lock");
        let mut st = c.prepare("SELECT v FROM msgs ORDER BY queue, seq")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        let mut i = 0usize;
        while let Some(row) = rows.next()? {
            if i.is_multiple_of(every) {
                let v: Vec<u8> = row.get(0)?;
                out.extend(sample_of(&v));
            }
            i += 1;
        }
        Ok(out)
    }

    fn deleted_key_exists(&self) -> R<bool> {
        Ok(true)
    }
}
