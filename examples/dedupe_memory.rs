//! Index memory per message with and without a client message id (for BENCHMARKS.md):
//! `cargo run --release --example dedupe_memory`.

use std::sync::Arc;
use std::time::Duration;

use cinder::{ClientMessageId, Durability, FileKeyProvider, Options, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = std::env::temp_dir().join(format!("cinder-dedupe-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let key = Arc::new(FileKeyProvider::create(tmp.join("key"))?);
    let n: u32 = 200_000;
    let mut per = Vec::new();
    for with_id in [false, true] {
        let dir = tmp.join(format!("data-{with_id}"));
        let mut o = Options::new(key.clone());
        o.durability = Durability::Async;
        o.background_reaper = false;
        let store = Store::open(&dir, o)?;
        let before = store.index_memory();
        for i in 0..n {
            let q = format!("q{}", i % 1000);
            if with_id {
                let mut c = [0u8; 16];
                c[..4].copy_from_slice(&i.to_le_bytes());
                store.append_once(
                    q.as_bytes(),
                    ClientMessageId(c),
                    b"x",
                    Duration::from_secs(3600),
                )?;
            } else {
                store.append(q.as_bytes(), b"x", Duration::from_secs(3600))?;
            }
        }
        let bytes = (store.index_memory() - before) as f64 / f64::from(n);
        println!("index memory per message, client id {with_id}: {bytes:.1} B");
        per.push(bytes);
        store.close()?;
    }
    println!(
        "client id on record: {:.1} B more per message",
        per[1] - per[0]
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
