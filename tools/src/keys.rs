//! `cinder keys status|rotate|export|import|audit`: the key hierarchy, master-key
//! rotation, passphrase-sealed backup of the master key, and the key audit log. Nothing here prints secret material: key ids are public fingerprints.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use crate::Fatal;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Show the key hierarchy: master keys, how many live data keys each wraps and how
    /// old they are, rotations, epochs. Needs no key (ids are plaintext framing).
    Status {
        /// The data dir.
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rotate the master key of a stopped store: re-wrap every live data key under the
    /// new key (a running store does the same with `Store::rotate_master_key`). A crash
    /// midway leaves a store that opens with the old key, or with the new one given the
    /// old as the previous key.
    Rotate {
        /// The data dir.
        dir: PathBuf,
        /// The current master key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The new master key file.
        #[arg(long)]
        new_key_file: PathBuf,
        /// Create the new key file (0600) if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Write a backup of the master key file, sealed under a passphrase (Argon2id, then
    /// ChaCha20-Poly1305). Data keys are never backed up: shredded data stays shredded.
    Export {
        /// The master key file.
        #[arg(long)]
        key_file: PathBuf,
        /// A file holding the passphrase (mode 0600; one trailing newline is ignored).
        #[arg(long)]
        passphrase_file: PathBuf,
        /// Where to write the backup (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a master key file from a backup.
    Import {
        /// The backup written by `keys export`.
        #[arg(long)]
        backup: PathBuf,
        /// A file holding the passphrase (mode 0600; one trailing newline is ignored).
        #[arg(long)]
        passphrase_file: PathBuf,
        /// The key file to create (mode 0600; never overwritten).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Print the key audit log and check its hash chain (and, with the key, that it
    /// reaches the point the keystore vouches for).
    Audit {
        /// The data dir.
        dir: PathBuf,
        /// The master key file: also check the log against the keystore.
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(c: &Cmd) -> Result<bool, Fatal> {
    match c {
        Cmd::Status { dir, json } => status(dir, *json),
        Cmd::Rotate {
            dir,
            key_file,
            new_key_file,
            create,
        } => rotate(dir, key_file, new_key_file, *create),
        Cmd::Audit {
            dir,
            key_file,
            json,
        } => audit(dir, key_file.as_ref(), *json),
        Cmd::Export {
            key_file,
            passphrase_file,
            out,
        } => {
            let key = crate::key(key_file)?;
            let pass = cinder::keys::read_secret(passphrase_file)?;
            let b = key.export_backup(&pass, cinder::keys::backup::BackupParams::default())?;
            cinder::keys::write_new_private(out, &b)?;
            println!(
                "wrote a backup of master key {} to {} (restore with `cinder keys import`)",
                hex(cinder::KeyProvider::kek_id(&*key)),
                out.display()
            );
            Ok(true)
        }
        Cmd::Import {
            backup,
            passphrase_file,
            key_file,
        } => {
            let b = std::fs::read(backup)
                .map_err(|e| Fatal(format!("cannot read {}: {e}", backup.display())))?;
            let pass = cinder::keys::read_secret(passphrase_file)?;
            let k = cinder::FileKeyProvider::import_backup(&b, &pass, key_file)?;
            println!(
                "restored master key {} to {}",
                hex(cinder::KeyProvider::kek_id(&k)),
                key_file.display()
            );
            Ok(true)
        }
    }
}

fn hex(id: u64) -> String {
    format!("{id:016x}")
}

fn status(dir: &std::path::Path, as_json: bool) -> Result<bool, Fatal> {
    let dir = crate::data_dir(dir)?;
    let s = cinder::key_status(&dir)?;
    if as_json {
        let mk: Vec<_> = s
            .master_keys
            .iter()
            .map(|m| {
                json!({"kek_id": hex(m.kek_id), "provider": m.provider, "current": m.current,
                       "live_data_keys": m.live_data_keys,
                       "oldest_data_key_ms": m.oldest_dek_ms, "newest_data_key_ms": m.newest_dek_ms})
            })
            .collect();
        let doc = json!({
            "master_keys": mk,
            "live_data_keys": s.live_data_keys,
            "rotations": s.rotations,
            "last_rotation_ms": s.last_rotation_ms,
            "audit_records": s.audit_records,
            "epochs": s.epochs,
        });
        println!("{doc}");
        return Ok(true);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let age = |t: Option<u64>| {
        t.map_or("-".into(), |t| {
            format!("{:.0} s", now.saturating_sub(t) as f64 / 1e3)
        })
    };
    println!("live data keys: {}", s.live_data_keys);
    for m in &s.master_keys {
        println!(
            "master key {} ({}){}: wraps {} live data keys (oldest {}, newest {})",
            hex(m.kek_id),
            m.provider,
            if m.current { " (current)" } else { "" },
            m.live_data_keys,
            age(m.oldest_dek_ms),
            age(m.newest_dek_ms)
        );
    }
    println!(
        "rotations: {} (last {} ago)",
        s.rotations,
        age(s.last_rotation_ms)
    );
    println!(
        "epoch keys in use: {}",
        if s.epochs.is_empty() {
            "none".into()
        } else {
            format!("{:?}", s.epochs)
        }
    );
    match s.audit_records {
        Some(n) => println!("key audit log: {n} records"),
        None => println!("key audit log: none yet"),
    }
    Ok(true)
}

fn rotate(
    dir: &std::path::Path,
    key_file: &std::path::Path,
    new_key_file: &std::path::Path,
    create: bool,
) -> Result<bool, Fatal> {
    let dir = crate::data_dir(dir)?;
    let old = crate::key(key_file)?;
    let new = Arc::new(cinder::FileKeyProvider::open_or_create(
        new_key_file,
        create,
    )?);
    let mut o = cinder::Options::new(old);
    o.background_reaper = false;
    let store = cinder::Store::open(&dir, o)?;
    let r = store.rotate_master_key(new)?;
    store.close()?;
    println!(
        "rotated master key {} -> {}: {} live data keys re-wrapped",
        hex(r.old_kek_id),
        hex(r.new_kek_id),
        r.rewrapped
    );
    Ok(true)
}

fn audit(dir: &std::path::Path, key_file: Option<&PathBuf>, as_json: bool) -> Result<bool, Fatal> {
    let dir = crate::data_dir(dir)?;
    let key = key_file.map(|k| crate::key(k)).transpose()?;
    let log =
        match cinder::key_audit_log(&dir, key.as_deref().map(|k| k as &dyn cinder::KeyProvider)) {
            Ok(l) => l,
            Err(cinder::Error::Corruption { file, offset, kind }) => {
                eprintln!("{}: offset {offset}: {kind}", file.display());
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
    let ok = log.matches_keystore != Some(false);
    if as_json {
        let recs: Vec<_> = log
            .records
            .iter()
            .map(|r| {
                json!({"seq": r.seq, "time_ms": r.time_ms, "event": r.event.name(),
                       "subject": r.subject, "key_id": hex(r.key_id)})
            })
            .collect();
        println!(
            "{}",
            json!({"ok": ok, "records": recs, "torn_tail": log.torn_tail, "matches_keystore": log.matches_keystore,
                   "verified": log.verified, "log_version": log.version})
        );
        return Ok(ok);
    }
    for r in &log.records {
        println!(
            "{:>6}  {}  {:<20} subject {:<6} key {}",
            r.seq,
            r.time_ms,
            r.event.name(),
            r.subject,
            hex(r.key_id)
        );
    }
    if log.verified {
        println!("chain: ok ({} records)", log.records.len());
    } else {
        println!(
            "chain: structure ok ({} records); macs not checked (give --key-file to check them)",
            log.records.len()
        );
    }
    if log.torn_tail > 0 {
        println!(
            "note: a torn last record ({} bytes) of an interrupted append",
            log.torn_tail
        );
    }
    match log.matches_keystore {
        Some(true) => println!("keystore anchor: matches"),
        Some(false) => println!(
            "keystore anchor: DOES NOT MATCH (records removed from the end, or the log replaced)"
        ),
        None => {}
    }
    Ok(ok)
}
