//! The backends: cinder and the peers a relay would otherwise embed.

pub mod cinder;
#[cfg(feature = "fjall")]
pub mod fjall;
#[cfg(feature = "redb")]
pub mod redb;
#[cfg(feature = "rocksdb")]
pub mod rocks;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::path::Path;
use std::time::Duration;

use self::cinder::{Cinder, CinderMode};
use crate::backend::{Backend, Mode, R};

/// Names of the backends compiled in, cinder first.
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["cinder"];
    if cfg!(feature = "rocksdb") {
        v.push("rocksdb");
    }
    if cfg!(feature = "fjall") {
        v.push("fjall");
    }
    if cfg!(feature = "redb") {
        v.push("redb");
    }
    if cfg!(feature = "sqlite") {
        v.push("sqlite");
    }
    v
}

/// Opens backend `name` in `dir`. cinder's key file goes to `key_dir` (outside `dir`).
pub fn open(
    name: &str,
    dir: &Path,
    key_dir: &Path,
    mode: Mode,
    cinder_mode: Option<CinderMode>,
    shred_delay: Duration,
) -> R<Box<dyn Backend>> {
    if name != "cinder" {
        // cinder creates its own dir (0700).
        std::fs::create_dir_all(dir)?;
    }
    Ok(match name {
        "cinder" => Box::new(Cinder::open(
            dir,
            key_dir,
            cinder_mode.unwrap_or(CinderMode::for_mode(mode)),
            shred_delay,
        )?),
        #[cfg(feature = "rocksdb")]
        "rocksdb" => Box::new(rocks::Rocks::open(dir, mode)?),
        #[cfg(feature = "fjall")]
        "fjall" => Box::new(fjall::Fjall::open(dir, mode)?),
        #[cfg(feature = "redb")]
        "redb" => Box::new(redb::Redb::open(dir, mode)?),
        #[cfg(feature = "sqlite")]
        "sqlite" => Box::new(sqlite::Sqlite::open(dir, mode)?),
        other => return Err(format!("backend {other} not compiled in (see --features)").into()),
    })
}
