//! Accounts: a recipient queue id and the hash of its bearer token.
//!
//! Tokens are 256 random bits from the OS; only a BLAKE3 derive-key hash of each is kept,
//! in memory and in the accounts file. Tokens are never logged or written anywhere.
//!
//! The file (mode 0600, kept outside the data dir) is a log of lines:
//!
//! ```text
//! cinder-relay accounts v1
//! + <queue> <64 hex digits: hash of the token>
//! - <queue>
//! ```
//!
//! Each change is appended and fsynced before the request that made it is answered. At
//! start (and when removals pile up) the log is compacted crash-safely: written to a temp
//! file, fsynced, renamed over the old one, and the directory fsynced. A torn last line (a
//! crash in the middle of an append, never answered) is dropped.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

const HEADER: &str = "cinder-relay accounts v1";
const HASH_CONTEXT: &str = "cinder-relay 2025-01 bearer token v1";
/// Bytes of randomness in a queue id (128 bits, 22 base64url characters).
const QUEUE_ID_BYTES: usize = 16;
/// Bytes of randomness in a token (256 bits, 43 base64url characters).
const TOKEN_BYTES: usize = 32;
/// The log is compacted once it holds this many dead lines more than live ones.
#[cfg(not(test))]
const COMPACT_SLACK: usize = 1024;
#[cfg(test)]
const COMPACT_SLACK: usize = 16;

type TokenHash = [u8; 32];

/// The result of checking a bearer token against a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// The token is the queue's.
    Ok,
    /// No such token.
    Unauthorized,
    /// The token is valid, for another queue.
    Forbidden,
}

/// What `rotate_token` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token now in force.
    Done(String),
    /// The presented token is not this queue's.
    Refused(Auth),
    /// The chosen token is not 43 base64url characters (or is another account's).
    BadToken,
}

/// A token as the relay issues them: 43 base64url characters (256 bits).
fn valid_token(t: &str) -> bool {
    t.len() == 43
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && URL_SAFE_NO_PAD
            .decode(t)
            .is_ok_and(|b| b.len() == TOKEN_BYTES)
}

struct Entry {
    hash: TokenHash,
    /// Subscribers (WebSocket sessions) see `changed()` return `Ok` when the token is
    /// replaced, and fail when the account is removed (the sender is dropped).
    gone: watch::Sender<()>,
}

#[derive(Default)]
struct Maps {
    by_queue: HashMap<String, Entry>,
    by_hash: HashMap<TokenHash, String>,
}

struct Log {
    file: File,
    /// Lines in the file that a compaction would drop.
    dead_lines: usize,
}

/// The account registry, persisted in the accounts file.
pub struct Accounts {
    path: PathBuf,
    maps: RwLock<Maps>,
    log: Mutex<Log>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("path", &self.path)
            .field("accounts", &self.len())
            .finish_non_exhaustive()
    }
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> TokenHash {
    blake3::derive_key(HASH_CONTEXT, token.as_bytes())
}

/// Constant-time equality of two hashes.
pub fn ct_eq(a: &TokenHash, b: &TokenHash) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn random_b64(n: usize) -> io::Result<String> {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf).map_err(|e| io::Error::other(format!("OS RNG: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(&buf))
}

fn hex(h: &TokenHash) -> String {
    use std::fmt::Write as _;
    h.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<TokenHash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn valid_queue_id(q: &str) -> bool {
    !q.is_empty()
        && q.len() <= 64
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn bad_data(path: &Path, line: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} line {line}: {what}", path.display()),
    )
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// What `open` found.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub created: bool,
    pub torn_tail_dropped: bool,
}

impl Accounts {
    /// Loads (or creates) the accounts file, compacts it and takes its lock.
    pub fn open(path: &Path) -> io::Result<(Accounts, LoadReport)> {
        let mut report = LoadReport::default();
        // Hold the old file's lock while compacting, so two relays never share a file.
        let old = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(f) = &old {
            lock(f, path)?;
        }
        let mut maps = Maps::default();
        if old.is_some() {
            let text = fs::read(path)?;
            report.torn_tail_dropped = parse(path, &text, &mut maps)?;
        } else {
            report.created = true;
        }
        let file = write_compacted(path, &maps)?;
        drop(old);
        Ok((
            Accounts {
                path: path.to_path_buf(),
                maps: RwLock::new(maps),
                log: Mutex::new(Log {
                    file,
                    dead_lines: 0,
                }),
            },
            report,
        ))
    }

    pub fn len(&self) -> usize {
        self.maps.read().by_queue.len()
    }

    pub fn exists(&self, queue: &str) -> bool {
        self.maps.read().by_queue.contains_key(queue)
    }

    /// Creates an account; returns its queue id and token. Durable when it returns.
    pub fn create(&self) -> io::Result<(String, String)> {
        let token = random_b64(TOKEN_BYTES)?;
        let hash = hash_token(&token);
        let mut log = self.log.lock();
        let queue = loop {
            let q = random_b64(QUEUE_ID_BYTES)?;
            if !self.maps.read().by_queue.contains_key(&q) {
                break q;
            }
        };
        if self.maps.read().by_hash.contains_key(&hash) {
            // 2^-256: the RNG is broken.
            return Err(io::Error::other("token collision: the OS RNG is broken"));
        }
        append_line(&mut log.file, &format!("+ {queue} {}\n", hex(&hash)))?;
        let mut maps = self.maps.write();
        maps.by_hash.insert(hash, queue.clone());
        maps.by_queue.insert(
            queue.clone(),
            Entry {
                hash,
                gone: watch::Sender::new(()),
            },
        );
        Ok((queue, token))
    }

    /// Removes an account; `false` if there was none. Durable when it returns.
    pub fn remove(&self, queue: &str) -> io::Result<bool> {
        let mut log = self.log.lock();
        if !self.exists(queue) {
            return Ok(false);
        }
        append_line(&mut log.file, &format!("- {queue}\n"))?;
        {
            let mut maps = self.maps.write();
            if let Some(e) = maps.by_queue.remove(queue) {
                maps.by_hash.remove(&e.hash);
            }
        }
        // The "+" line and this one are dead now.
        log.dead_lines += 2;
        let live = self.len();
        if log.dead_lines > COMPACT_SLACK + live {
            let maps = self.maps.read();
            log.file = write_compacted(&self.path, &maps)?;
            log.dead_lines = 0;
        }
        Ok(true)
    }

    /// Replaces `queue`'s token, if `presented` is its token now (checked under the
    /// log's lock, so of two rotations with the same token only the first succeeds), with
    /// `chosen` (43 base64url characters: 256 bits the client picked, so a rotation whose
    /// answer was lost can be repeated with the new token: rotating to the token already
    /// current is a no-op) or a new random one. The old token stops working at once, and
    /// sessions opened with it are told (`subscribe`). Durable when it returns.
    pub fn rotate_token(
        &self,
        queue: &str,
        presented: &str,
        chosen: Option<&str>,
    ) -> io::Result<Rotation> {
        let token = match chosen {
            Some(t) if valid_token(t) => t.to_string(),
            Some(_) => return Ok(Rotation::BadToken),
            None => random_b64(TOKEN_BYTES)?,
        };
        let hash = hash_token(&token);
        let mut log = self.log.lock();
        match self.authorize(queue, presented) {
            Auth::Ok => {}
            Auth::Unauthorized => return Ok(Rotation::Refused(Auth::Unauthorized)),
            Auth::Forbidden => return Ok(Rotation::Refused(Auth::Forbidden)),
        }
        if self.authorize(queue, &token) == Auth::Ok {
            return Ok(Rotation::Done(token)); // already current: a repeated rotation
        }
        if self.maps.read().by_hash.contains_key(&hash) {
            return Ok(Rotation::BadToken); // another account's token
        }
        // A second "+" line for the queue replaces the first when the file is read.
        append_line(&mut log.file, &format!("+ {queue} {}\n", hex(&hash)))?;
        {
            let mut maps = self.maps.write();
            let Maps { by_queue, by_hash } = &mut *maps;
            if let Some(e) = by_queue.get_mut(queue) {
                by_hash.remove(&e.hash);
                e.hash = hash;
                by_hash.insert(hash, queue.to_string());
                e.gone.send_replace(());
            }
        }
        log.dead_lines += 1;
        Ok(Rotation::Done(token))
    }

    /// Checks `token` for `queue`. The hash comparison is constant-time.
    pub fn authorize(&self, queue: &str, token: &str) -> Auth {
        let h = hash_token(token);
        let maps = self.maps.read();
        if let Some(e) = maps.by_queue.get(queue) {
            if ct_eq(&e.hash, &h) {
                return Auth::Ok;
            }
        }
        if maps.by_hash.contains_key(&h) {
            Auth::Forbidden
        } else {
            Auth::Unauthorized
        }
    }

    /// A receiver whose `changed()` returns `Ok` once the token is replaced and fails once
    /// the account is removed.
    pub fn subscribe(&self, queue: &str) -> Option<watch::Receiver<()>> {
        self.maps
            .read()
            .by_queue
            .get(queue)
            .map(|e| e.gone.subscribe())
    }
}

fn lock(f: &File, path: &Path) -> io::Result<()> {
    match f.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another cinder-relay; stop it first",
                path.display()
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

fn append_line(file: &mut File, line: &str) -> io::Result<()> {
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// Parses the log into `maps`. Returns whether a torn last line was dropped.
fn parse(path: &Path, text: &[u8], maps: &mut Maps) -> io::Result<bool> {
    let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    // The piece after the last newline: empty unless an append was torn.
    let mut torn = !lines.pop().unwrap_or_default().is_empty();
    if lines.first() != Some(&HEADER.as_bytes()) {
        return Err(bad_data(path, 1, "not a cinder-relay accounts file"));
    }
    let n = lines.len();
    for (i, line) in lines.iter().enumerate().skip(1) {
        let ok = std::str::from_utf8(line).is_ok_and(|l| apply(l, maps));
        if !ok {
            // Only the last line can be a torn append; anything else is damage.
            if i + 1 == n {
                torn = true;
            } else {
                return Err(bad_data(path, i + 1, "malformed record"));
            }
        }
    }
    Ok(torn)
}

fn apply(line: &str, maps: &mut Maps) -> bool {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("+"), Some(q), Some(h), None) if valid_queue_id(q) => {
            let Some(hash) = unhex(h) else { return false };
            if let Some(old) = maps.by_queue.insert(
                q.to_string(),
                Entry {
                    hash,
                    gone: watch::Sender::new(()),
                },
            ) {
                maps.by_hash.remove(&old.hash);
            }
            maps.by_hash.insert(hash, q.to_string());
            true
        }
        (Some("-"), Some(q), None, None) if valid_queue_id(q) => {
            if let Some(e) = maps.by_queue.remove(q) {
                maps.by_hash.remove(&e.hash);
            }
            true
        }
        _ => false,
    }
}

/// Writes the live accounts to a temp file, fsyncs it, renames it over `path` and fsyncs
/// the directory. Returns the new file, locked and positioned at its end for appends.
fn write_compacted(path: &Path, maps: &Maps) -> io::Result<File> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    lock(&f, &tmp)?;
    let mut text = String::with_capacity(32 + maps.by_queue.len() * 92);
    text.push_str(HEADER);
    text.push('\n');
    let mut queues: Vec<(&String, &Entry)> = maps.by_queue.iter().collect();
    queues.sort_by(|a, b| a.0.cmp(b.0));
    for (q, e) in queues {
        text.push_str("+ ");
        text.push_str(q);
        text.push(' ');
        text.push_str(&hex(&e.hash));
        text.push('\n');
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_parent(path)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_authorize_remove_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let (a, rep) = Accounts::open(&path).unwrap();
        assert!(rep.created);
        let (q1, t1) = a.create().unwrap();
        let (q2, t2) = a.create().unwrap();
        assert_eq!(q1.len(), 22);
        assert_eq!(t1.len(), 43);
        assert_eq!(a.authorize(&q1, &t1), Auth::Ok);
        assert_eq!(a.authorize(&q1, &t2), Auth::Forbidden);
        assert_eq!(a.authorize(&q1, "nope"), Auth::Unauthorized);
        assert_eq!(a.authorize("unknown", &t1), Auth::Forbidden);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&t1) && !text.contains(&t2), "tokens on disk");
        assert!(a.remove(&q2).unwrap());
        assert!(!a.remove(&q2).unwrap());
        drop(a);
        let (b, _) = Accounts::open(&path).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b.authorize(&q1, &t1), Auth::Ok);
        assert_eq!(b.authorize(&q2, &t2), Auth::Unauthorized);
    }

    #[test]
    fn a_rotated_token_replaces_the_old_one_at_once_and_after_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let (a, _) = Accounts::open(&path).unwrap();
        let (q, old) = a.create().unwrap();
        let watch = a.subscribe(&q).unwrap();
        let Rotation::Done(new) = a.rotate_token(&q, &old, None).unwrap() else {
            panic!()
        };
        assert_ne!(old, new);
        assert_eq!(a.authorize(&q, &old), Auth::Unauthorized);
        assert_eq!(a.authorize(&q, &new), Auth::Ok);
        assert!(watch.has_changed().unwrap(), "sessions are told");
        assert_eq!(
            a.rotate_token("nobody", &new, None).unwrap(),
            Rotation::Refused(Auth::Forbidden)
        );
        // The old token cannot rotate again (two rotations racing: one wins).
        assert_eq!(
            a.rotate_token(&q, &old, None).unwrap(),
            Rotation::Refused(Auth::Unauthorized)
        );
        // A chosen token; repeating that rotation with it is a no-op.
        let chosen = random_b64(TOKEN_BYTES).unwrap();
        assert_eq!(
            a.rotate_token(&q, &new, Some(&chosen)).unwrap(),
            Rotation::Done(chosen.clone())
        );
        assert_eq!(
            a.rotate_token(&q, &chosen, Some(&chosen)).unwrap(),
            Rotation::Done(chosen.clone())
        );
        assert_eq!(
            a.rotate_token(&q, &chosen, Some("short")).unwrap(),
            Rotation::BadToken
        );
        let new = chosen;
        drop(a);
        let (b, _) = Accounts::open(&path).unwrap();
        assert_eq!(b.authorize(&q, &old), Auth::Unauthorized);
        assert_eq!(b.authorize(&q, &new), Auth::Ok);
        assert!(!fs::read_to_string(&path).unwrap().contains(&new));
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let (_a, _) = Accounts::open(&path).unwrap();
        assert!(Accounts::open(&path).is_err());
    }

    #[test]
    fn torn_tail_is_dropped_and_garbage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let (first, _) = Accounts::open(&path).unwrap();
        let (queue, token) = first.create().unwrap();
        drop(first);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"+ abc 12").unwrap();
        drop(file);
        let (second, rep) = Accounts::open(&path).unwrap();
        assert!(rep.torn_tail_dropped);
        assert_eq!(second.authorize(&queue, &token), Auth::Ok);
        drop(second);
        let mut text = fs::read_to_string(&path).unwrap();
        text.insert_str(HEADER.len() + 1, "junk\n");
        fs::write(&path, text).unwrap();
        assert!(Accounts::open(&path).is_err());
    }

    #[test]
    fn compaction_after_many_removals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let (a, _) = Accounts::open(&path).unwrap();
        let (keep, tk) = a.create().unwrap();
        for _ in 0..30 {
            let (q, _) = a.create().unwrap();
            a.remove(&q).unwrap();
        }
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 40, "{lines} lines: not compacted");
        let (q, t) = a.create().unwrap();
        drop(a);
        let (b, _) = Accounts::open(&path).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.authorize(&keep, &tk), Auth::Ok);
        assert_eq!(b.authorize(&q, &t), Auth::Ok);
    }

    #[test]
    fn ct_eq_works() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] ^= 1;
        assert!(!ct_eq(&a, &b));
    }
}
