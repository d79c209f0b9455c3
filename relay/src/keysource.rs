//! Where the master key comes from:
//!
//! - a key file (`--key-file`, the default): generated for a new data dir, refused if
//!   missing for one that holds data; not rotated;
//! - a key directory (`--key-dir`): master keys as `master-NNNNNN.key` files, the newest
//!   current. `--rotate-master-every` makes the next one there and has the engine rotate
//!   to it online (`Options::auto_rotation`); a key no longer current is destroyed
//!   (overwritten, synced, unlinked) as soon as the store runs under its successor;
//! - a PKCS#11 token (`--pkcs11-module`, `--pkcs11-token-label`, `--pkcs11-pin-file`): the
//!   key-encryption keys are the provider's epoch keys, made in the token and destroyed
//!   there once their epoch (`--pkcs11-epoch`, default 1 h) is over — that is the HSM's
//!   master-key rotation, so `--rotate-master-every` is not for it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cinder::{FileKeyProvider, KeyProvider};
use tracing::{info, warn};

use crate::cli::Cli;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The opened master key and what goes with it.
pub struct MasterKey {
    pub provider: Arc<dyn KeyProvider>,
    /// The key the keystore is under when a rotation was cut short (the engine finishes
    /// it at open).
    pub previous: Option<Arc<dyn KeyProvider>>,
    pub rotation: Option<cinder::AutoRotation>,
    /// The key directory, for destroying keys once the store no longer needs them.
    pub dir: Option<KeyDir>,
    /// One line for the startup summary.
    pub summary: String,
}

/// Opens the master key the flags name. `data_has_files`: a new key is made only for a
/// data dir without data. `store_kek`: the id of the key the data dir's keystore is
/// under, if it has one.
pub fn open(
    cli: &Cli,
    data_has_files: bool,
    store_kek: Option<u64>,
) -> Result<MasterKey, BoxError> {
    if let Some(module) = &cli.pkcs11_module {
        return open_pkcs11(cli, module);
    }
    if let Some(dir) = &cli.key_dir {
        let kd = KeyDir::new(dir)?;
        return kd.open(data_has_files, store_kek, cli.rotate_master_every);
    }
    let path = cli.key_file_path();
    let (key, generated) = open_file(&path, &cli.data, data_has_files)?;
    Ok(MasterKey {
        provider: Arc::new(key),
        previous: None,
        rotation: None,
        dir: None,
        summary: format!(
            "{}{}",
            crate::resolve(&path).display(),
            if generated { " (generated now)" } else { "" }
        ),
    })
}

fn open_pkcs11(cli: &Cli, module: &Path) -> Result<MasterKey, BoxError> {
    let (Some(token), Some(pin)) = (&cli.pkcs11_token_label, &cli.pkcs11_pin_file) else {
        return Err("--pkcs11-module needs --pkcs11-token-label and --pkcs11-pin-file".into());
    };
    let mut cfg = cinder::Pkcs11Config::new(module, token, cinder::PinSource::File(pin.clone()));
    cfg.key_label.clone_from(&cli.pkcs11_key_label);
    cfg.epoch = cli.pkcs11_epoch;
    let provider = cinder::Pkcs11KeyProvider::open(cfg)?;
    Ok(MasterKey {
        provider: Arc::new(provider),
        previous: None,
        rotation: None,
        dir: None,
        summary: format!(
            "PKCS#11 token {token:?} via {} (epoch keys of {}s, made and destroyed in the token)",
            module.display(),
            cli.pkcs11_epoch.as_secs()
        ),
    })
}

/// Opens the key file (outside the data dir: checked before). A new key is generated
/// only for a new data dir: one that holds data needs its own key back.
fn open_file(
    path: &Path,
    data: &Path,
    data_has_files: bool,
) -> Result<(FileKeyProvider, bool), BoxError> {
    match FileKeyProvider::open(path) {
        Ok(k) => Ok((k, false)),
        Err(cinder::Error::KeyFileMissing { .. }) if !data_has_files => {
            let key = FileKeyProvider::create(path)?;
            warn!(
                "generated a new master key at {} (mode 0600). Anyone with this file \
                 and the data dir can read stored messages; losing it loses them. Production \
                 wants an HSM or a key on separate storage, never next to the data.",
                crate::resolve(path).display()
            );
            Ok((key, true))
        }
        Err(cinder::Error::KeyFileMissing { .. }) => Err(format!(
            "master key file {} is missing but the data dir {} holds data: restore the key \
             (a new one could not read it)",
            path.display(),
            data.display()
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// A directory of master key files, `master-NNNNNN.key`, the highest number current.
#[derive(Debug, Clone)]
pub struct KeyDir {
    dir: PathBuf,
    /// The key the store ran under, settled, at the last check of `destroy_replaced`.
    settled: Arc<parking_lot::Mutex<Option<u64>>>,
}

const PREFIX: &str = "master-";
const SUFFIX: &str = ".key";

impl KeyDir {
    /// The directory, made (0700) if missing.
    pub fn new(dir: &Path) -> Result<Self, BoxError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(KeyDir {
            dir: dir.to_path_buf(),
            settled: Arc::default(),
        })
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{n:06}{SUFFIX}"))
    }

    /// The key files, by number.
    fn list(&self) -> Result<Vec<(u64, PathBuf)>, BoxError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix(PREFIX)?.strip_suffix(SUFFIX))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            out.push((n, e.path()));
        }
        out.sort();
        Ok(out)
    }

    fn open(
        self,
        data_has_files: bool,
        store_kek: Option<u64>,
        rotate_every: Option<Duration>,
    ) -> Result<MasterKey, BoxError> {
        let keys = self.list()?;
        let (newest_n, provider, generated) = match keys.last() {
            Some((n, p)) => (*n, FileKeyProvider::open(p)?, false),
            None if data_has_files => {
                return Err(format!(
                    "the key directory {} holds no master key but the data dir holds data: \
                     restore its key (a new one could not read it)",
                    self.dir.display()
                )
                .into())
            }
            None => {
                let k = FileKeyProvider::create(self.path(1))?;
                warn!(
                    "generated the first master key in {} (mode 0600); production wants the \
                     key directory on separate storage, never next to the data",
                    self.dir.display()
                );
                (1, k, true)
            }
        };
        // A rotation cut short leaves the keystore under an older key: the engine
        // finishes it when that one is given as the previous key.
        let mut previous: Option<Arc<dyn KeyProvider>> = None;
        if let Some(kek) = store_kek.filter(|&k| k != provider.kek_id()) {
            let old = keys
                .iter()
                .filter_map(|(_, p)| FileKeyProvider::open(p).ok())
                .find(|k| k.kek_id() == kek)
                .ok_or_else(|| {
                    format!(
                        "no key in {} is the one the data dir's keystore is under ({kek:016x})",
                        self.dir.display()
                    )
                })?;
            previous = Some(Arc::new(old));
        }
        let rotation = rotate_every.map(|every| {
            let kd = self.clone();
            cinder::AutoRotation {
                every,
                next_key: Arc::new(move || {
                    kd.make_next()
                        .map_err(|e| cinder::Error::KeyProvider(e.to_string()))
                }),
            }
        });
        let summary = format!(
            "key directory {} (current {}{}{})",
            crate::resolve(&self.dir).display(),
            self.path(newest_n)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            if generated { ", generated now" } else { "" },
            rotate_every.map_or(String::new(), |d| format!(
                "; a new one every {}s, the old one destroyed",
                d.as_secs()
            ))
        );
        Ok(MasterKey {
            provider: Arc::new(provider),
            previous,
            rotation,
            dir: Some(self),
            summary,
        })
    }

    /// Makes the next key file (mode 0600, fsynced).
    fn make_next(&self) -> Result<Arc<dyn KeyProvider>, BoxError> {
        let next = self.list()?.last().map_or(1, |(n, _)| n + 1);
        let k = FileKeyProvider::create(self.path(next))?;
        info!(
            "made master key {} for a rotation",
            self.path(next)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        Ok(Arc::new(k))
    }

    /// Destroys the keys a rotation replaced, once nothing can need them. The engine
    /// switches its in-memory key before it writes the keystore, may switch back if that
    /// write fails, and a keystore renamed into place is durable only once its directory
    /// is synced. So a key is destroyed only when the store runs under a newer key, the
    /// keystore file read *before* a sync of the data dir is under it (the sync then
    /// makes that rename durable), both still hold after the sync, and all of that held
    /// at the previous call too (a switch back happens within the failed write, long
    /// before the next check). Returns how many were destroyed.
    pub fn destroy_replaced(&self, data: &Path, store: &cinder::Store) -> Result<usize, BoxError> {
        let on_disk = || -> Result<Option<u64>, BoxError> {
            Ok(cinder::key_status(data)?
                .master_keys
                .iter()
                .find(|m| m.current)
                .map(|m| m.kek_id))
        };
        if self.list()?.len() <= 1 {
            return Ok(0); // nothing to destroy (the usual case): no sync either
        }
        let running = store.master_key_id();
        let read = on_disk()?;
        fs::File::open(data)?.sync_all()?;
        let settled = read == Some(running)
            && on_disk()? == Some(running)
            && store.master_key_id() == running;
        let mut seen = self.settled.lock();
        let confirmed = settled && *seen == Some(running);
        *seen = settled.then_some(running);
        drop(seen);
        if !confirmed {
            return Ok(0); // a rotation may be under way: next time
        }
        self.destroy_all_but(running)
    }

    /// Destroys every key file older than the one with id `current`: each is
    /// overwritten with zeros, synced and unlinked, then the directory is synced.
    fn destroy_all_but(&self, current: u64) -> Result<usize, BoxError> {
        let keys = self.list()?;
        let Some(cur_n) = keys.iter().find_map(|(n, p)| {
            FileKeyProvider::open(p)
                .ok()
                .filter(|k| k.kek_id() == current)
                .map(|_| *n)
        }) else {
            return Ok(0); // not ours to judge: the current key is elsewhere
        };
        let mut destroyed = 0;
        for (n, p) in keys.iter().filter(|(n, _)| *n < cur_n) {
            destroy(p)?;
            info!("destroyed master key {n:06}: the store no longer needs it");
            destroyed += 1;
        }
        if destroyed > 0 {
            fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(destroyed)
    }
}

/// Overwrites `path` with zeros, syncs, unlinks. (On flash and copy-on-write file systems
/// the old blocks may survive the overwrite; the unlink is what makes the key gone from
/// the directory, and the wrapped data keys it protected were re-wrapped already.)
fn destroy(path: &Path) -> std::io::Result<()> {
    let len = fs::metadata(path)?.len();
    let mut f = OpenOptions::new().write(true).mode(0o600).open(path)?;
    f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(0)])?;
    f.sync_all()?;
    drop(f);
    fs::remove_file(path)
}
