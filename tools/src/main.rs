//! `cinder`: inspect and verify a cinder data dir (read-only; safe to run while a store
//! has the dir open), and manage its keys (`keys rotate` needs the store stopped).
//!
//! Exit codes: 0 all good; 1 problems were found; 2 usage error, or the data dir or the
//! key cannot be opened.

mod inspect;
mod keys;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

/// Inspect and verify cinder data dirs.
#[derive(Debug, Parser)]
#[command(name = "cinder", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show what a data dir holds. Without a key: only what is in plaintext (what an
    /// attacker without keys sees). With the key: message counts, queues and ages.
    Inspect(inspect::Args),
    /// Check every checksum and AEAD tag, and that the keystore and the segment files
    /// agree. One line per problem: file, byte offset, what is wrong.
    Verify(verify::Args),
    /// Key management: status of the key hierarchy, master-key rotation, audit log.
    #[command(subcommand)]
    Keys(keys::Cmd),
}

/// A failure that means the job could not be done at all (exit 2).
#[derive(Debug)]
pub struct Fatal(String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

/// Opens the master key file read-only.
pub fn key(path: &Path) -> Result<Arc<cinder::FileKeyProvider>, Fatal> {
    Ok(Arc::new(cinder::FileKeyProvider::open(path)?))
}

/// Checks that `dir` is a directory we can read.
pub fn data_dir(dir: &Path) -> Result<PathBuf, Fatal> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Fatal(format!("cannot open data dir {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Fatal(format!("{} is not a directory", dir.display())));
    }
    Ok(dir.to_path_buf())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Inspect(a) => inspect::run(&a),
        Cmd::Verify(a) => verify::run(&a),
        Cmd::Keys(c) => keys::run(&c),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Fatal(msg)) => {
            eprintln!("cinder: {msg}");
            ExitCode::from(2)
        }
    }
}
