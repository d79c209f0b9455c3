//! Opens a store with a generated master key, appends, reads and acks a few messages,
//! and prints where everything is. (The relay server replaces this as the main job.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cinder::{FileKeyProvider, Options, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "cinder-data".into()),
    );
    let key_path = PathBuf::from(
        std::env::args()
            .nth(2)
            .unwrap_or_else(|| "cinder-master.key".into()),
    );
    let created = !key_path.exists();
    let key = Arc::new(FileKeyProvider::open_or_create(&key_path, true)?);
    if created {
        eprintln!(
            "generated master key {} (0600). Production wants an HSM or a key on separate storage.",
            key_path.display()
        );
    }
    let store = Store::open(&data, Options::new(key))?;
    println!("data dir:   {}", data.canonicalize()?.display());
    println!("master key: {}", key_path.canonicalize()?.display());
    let r = store.recovery_report();
    println!(
        "recovered:  {} segments, {} live messages",
        r.segments, r.live
    );
    let ttl = Duration::from_secs(600);
    let ids: Vec<_> = (0..3)
        .map(|i| store.append(b"demo-recipient", format!("message {i}").as_bytes(), ttl))
        .collect::<Result<_, _>>()?;
    let page = store.read(b"demo-recipient", None, 10)?;
    println!("read {} messages from demo-recipient", page.len());
    let acked = store.ack_batch(b"demo-recipient", &ids)?;
    println!("acked {acked}; stats: {:?}", store.stats());
    store.close()?;
    Ok(())
}
