//! A fault-injecting, power-cut-simulating [`FileSystem`] for tests.
//!
//! [`FaultFs`] does every operation on the real files (so `mmap`, `pread` and the engine's
//! own reads see what they would) and keeps, beside them, the *durable* image of one
//! directory: for each file, its bytes as of its last successful fsync; for the
//! directory, its entries as of its last successful directory fsync. [`FaultFs::crash_image`]
//! is what a power cut leaves: every byte not covered by a successful fsync is gone, and
//! so are creations, renames and unlinks the directory fsync did not cover.
//!
//! Faults: fail the n-th call of a kind of operation with ENOSPC, EIO or EDQUOT, write
//! only a prefix and then fail (a short write), or cut the power at the k-th mutating
//! call (that call and every later one fail with EIO and change nothing). A failed fsync
//! behaves like Linux: the data it should have made durable is lost for good, and a
//! later fsync of the same file reports success without bringing it back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use parking_lot::Mutex;

use super::{real, FileSystem, Op};

const EIO: i32 = 5;
/// The page-cache granularity of lost writes after a failed fsync.
const PAGE: usize = 4096;
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// How an injected fault fails its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// ENOSPC: the device is full.
    NoSpace,
    /// EDQUOT: the user's disk quota is used up.
    Quota,
    /// EIO: the device failed.
    Io,
    /// (writes) the first `keep` bytes are written, then ENOSPC.
    ShortWrite { keep: usize },
}

impl FaultKind {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            FaultKind::NoSpace | FaultKind::ShortWrite { .. } => ENOSPC,
            FaultKind::Quota => EDQUOT,
            FaultKind::Io => EIO,
        })
    }
}

/// One fault to inject: the `nth` (1-based) call of `op` from now on whose path contains
/// `path_contains` (any path if empty) fails with `kind`; with `sticky`, every matching
/// call from the `nth` on fails, until [`FaultFs::clear_faults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub op: Op,
    pub nth: u64,
    pub kind: FaultKind,
    pub path_contains: String,
    pub sticky: bool,
}

impl Fault {
    /// The `nth` call of `op` (any path) fails once with `kind`.
    pub fn nth(op: Op, nth: u64, kind: FaultKind) -> Self {
        Fault {
            op,
            nth,
            kind,
            path_contains: String::new(),
            sticky: false,
        }
    }

    /// Every call of `op` from the `nth` on fails with `kind`.
    pub fn from_nth(op: Op, nth: u64, kind: FaultKind) -> Self {
        Fault {
            sticky: true,
            ..Self::nth(op, nth, kind)
        }
    }

    /// Only calls on paths containing `s` count.
    #[must_use]
    pub fn on(mut self, s: &str) -> Self {
        self.path_contains = s.to_string();
        self
    }
}

/// A fault with its count of matching calls so far.
#[derive(Debug)]
struct Armed {
    fault: Fault,
    seen: u64,
}

/// What a power cut would leave of one file.
#[derive(Debug, Default)]
struct FileSim {
    durable: Vec<u8>,
    /// After a failed fsync: the pages that were dirty then (their writes are lost for
    /// good: the kernel marked them clean), and the durable image then. A later fsync
    /// keeps the old bytes of those pages unless a write touched them since.
    lost: Option<(std::collections::BTreeSet<u64>, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Sim {
    next_fid: u64,
    by_ino: HashMap<u64, u64>,
    files: HashMap<u64, FileSim>,
    /// The tracked directory's entries as a power cut would leave them.
    durable_names: BTreeMap<String, u64>,
    calls: u64,
    per_op: HashMap<Op, u64>,
    faults: Vec<Armed>,
    crash_at: Option<u64>,
    crashed: bool,
    /// The mutating call (by index) to fail once, and how.
    fail_call: Option<(u64, FaultKind)>,
    injected: u64,
    recent: VecDeque<String>,
}

/// The fault-injecting file system. See the module docs.
#[derive(Debug)]
pub struct FaultFs {
    dir: PathBuf,
    sim: Mutex<Sim>,
}

/// The files a power cut leaves in the tracked directory: name → bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashImage {
    pub files: BTreeMap<String, Vec<u8>>,
}

impl CrashImage {
    /// What a process crash leaves: every call that returned is in the page cache and
    /// survives (read the real files once the crashed process's calls have stopped).
    pub fn read_from(dir: &Path) -> io::Result<Self> {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() && e.file_name() != "LOCK" {
                files.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path())?,
                );
            }
        }
        Ok(CrashImage { files })
    }

    /// Replaces the contents of `dir` with this image (the `LOCK` file is kept as it is;
    /// it holds nothing).
    pub fn write_to(&self, dir: &Path) -> io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_name() != "LOCK" && e.file_type()?.is_file() {
                std::fs::remove_file(e.path())?;
            }
        }
        for (name, bytes) in &self.files {
            if name == "LOCK" {
                continue;
            }
            let f = real::create_new(&dir.join(name))?;
            f.write_all_at(bytes, 0)?;
            f.sync_all()?;
        }
        File::open(dir)?.sync_all()
    }
}

/// The outcome `before` decided for a call.
enum Verdict {
    Go,
    Fail(io::Error),
    Short(usize, io::Error),
}

impl FaultFs {
    /// Tracks `dir` (which must exist): the files in it now are taken as durable.
    pub fn new(dir: &Path) -> io::Result<Self> {
        let dir = dir.canonicalize()?;
        let me = FaultFs {
            dir,
            sim: Mutex::new(Sim::default()),
        };
        {
            let mut sim = me.sim.lock();
            for e in std::fs::read_dir(&me.dir)? {
                let e = e?;
                if !e.file_type()?.is_file() {
                    continue;
                }
                let fid = Self::register(&mut sim, e.metadata()?.ino());
                sim.files.get_mut(&fid).expect("registered").durable = std::fs::read(e.path())?;
                sim.durable_names
                    .insert(e.file_name().to_string_lossy().into_owned(), fid);
            }
        }
        Ok(me)
    }

    fn register(sim: &mut Sim, ino: u64) -> u64 {
        let fid = sim.next_fid;
        sim.next_fid += 1;
        sim.by_ino.insert(ino, fid);
        sim.files.insert(fid, FileSim::default());
        fid
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.sim.lock().faults.push(Armed { fault, seen: 0 });
    }

    /// Removes every fault not yet fired (a cut power stays cut).
    pub fn clear_faults(&self) {
        let mut s = self.sim.lock();
        s.faults.clear();
        s.fail_call = None;
    }

    /// Fails the `k`-th mutating call from the start (1-based), whatever its kind, once
    /// with `kind` (a write is cut short if `kind` is a short write).
    pub fn fail_call(&self, k: u64, kind: FaultKind) {
        self.sim.lock().fail_call = Some((k, kind));
    }

    /// Cuts the power at the `k`-th mutating call from the start (1-based): that call and
    /// every later one fail with EIO and change nothing, except that a write the cut
    /// lands on is torn: its first half is written (what a process killed inside a large
    /// `pwrite` leaves; a power cut drops it anyway, unsynced).
    pub fn crash_at(&self, k: u64) {
        self.sim.lock().crash_at = Some(k);
    }

    /// Cuts the power now.
    pub fn crash_now(&self) {
        let mut s = self.sim.lock();
        s.crashed = true;
        s.crash_at = Some(s.calls);
    }

    /// Whether the power was cut.
    pub fn crashed(&self) -> bool {
        self.sim.lock().crashed
    }

    /// Mutating calls so far (the crash points a workload offers).
    pub fn calls(&self) -> u64 {
        self.sim.lock().calls
    }

    /// Calls of `op` so far.
    pub fn count(&self, op: Op) -> u64 {
        self.sim.lock().per_op.get(&op).copied().unwrap_or(0)
    }

    /// Faults fired so far (power cut not counted).
    pub fn injected(&self) -> u64 {
        self.sim.lock().injected
    }

    /// The last few calls, for a failure message.
    pub fn recent_calls(&self) -> Vec<String> {
        self.sim.lock().recent.iter().cloned().collect()
    }

    /// What a power cut now would leave of the tracked directory.
    pub fn crash_image(&self) -> CrashImage {
        let sim = self.sim.lock();
        let files = sim
            .durable_names
            .iter()
            .map(|(name, fid)| {
                let bytes = sim.files.get(fid).map(|f| f.durable.clone());
                (name.clone(), bytes.unwrap_or_default())
            })
            .collect();
        CrashImage { files }
    }

    fn tracked(&self, path: &Path) -> bool {
        path.parent().is_some_and(|p| p == self.dir)
    }

    /// Counts the call and decides its fate.
    fn before(&self, op: Op, path: &Path) -> Verdict {
        let mut sim = self.sim.lock();
        let s = &mut *sim;
        if op.mutates() {
            s.calls += 1;
            if s.crashed || s.crash_at.is_some_and(|k| s.calls >= k) {
                let first = !s.crashed;
                s.crashed = true;
                let e = io::Error::from_raw_os_error(EIO);
                if first {
                    s.recent
                        .push_back(format!("#{} {op:?} {} <- cut", s.calls, short(path)));
                    // A write the cut lands on is torn: its first half reached the page
                    // cache (a process crash keeps it; a power cut drops it unsynced).
                    if op == Op::Write {
                        return Verdict::Short(usize::MAX, e);
                    }
                }
                return Verdict::Fail(e);
            }
        }
        *s.per_op.entry(op).or_default() += 1;
        let p = path.to_string_lossy();
        let mut verdict = Verdict::Go;
        if let Some((k, kind)) = s.fail_call {
            if op.mutates() && s.calls == k {
                s.fail_call = None;
                verdict = match kind {
                    FaultKind::ShortWrite { keep } if op == Op::Write => {
                        Verdict::Short(keep, kind.error())
                    }
                    k => Verdict::Fail(k.error()),
                };
            }
        }
        for a in &mut s.faults {
            if a.fault.op != op || !p.contains(a.fault.path_contains.as_str()) {
                continue;
            }
            a.seen += 1;
            let fires = if a.fault.sticky {
                a.seen >= a.fault.nth
            } else {
                a.seen == a.fault.nth
            };
            if fires && matches!(verdict, Verdict::Go) {
                verdict = match a.fault.kind {
                    FaultKind::ShortWrite { keep } if op == Op::Write => {
                        Verdict::Short(keep, a.fault.kind.error())
                    }
                    k => Verdict::Fail(k.error()),
                };
            }
        }
        s.faults.retain(|a| a.fault.sticky || a.seen < a.fault.nth);
        if !matches!(verdict, Verdict::Go) {
            s.injected += 1;
        }
        if op.mutates() {
            let tag = if matches!(verdict, Verdict::Go) {
                ""
            } else {
                " <- fault"
            };
            s.recent
                .push_back(format!("#{} {op:?} {}{tag}", s.calls, short(path)));
            if s.recent.len() > 32 {
                s.recent.pop_front();
            }
        }
        verdict
    }

    fn go(&self, op: Op, path: &Path) -> io::Result<()> {
        match self.before(op, path) {
            Verdict::Go => Ok(()),
            Verdict::Fail(e) | Verdict::Short(_, e) => Err(e),
        }
    }

    fn fid_of(sim: &mut Sim, file: &File) -> io::Result<u64> {
        let ino = file.metadata()?.ino();
        Ok(match sim.by_ino.get(&ino) {
            Some(&f) => f,
            None => Self::register(sim, ino),
        })
    }

    fn sync_file(&self, file: &File, path: &Path, all: bool) -> io::Result<()> {
        let verdict = self.before(Op::Sync, path);
        if !self.tracked(path) {
            return match verdict {
                Verdict::Go if all => file.sync_all(),
                Verdict::Go => file.sync_data(),
                Verdict::Fail(e) | Verdict::Short(_, e) => Err(e),
            };
        }
        // What the fsync covers: the file as it is when the call is made (one writer per
        // file at a time in the engine).
        let len = file.metadata()?.len() as usize;
        let mut now = vec![0u8; len];
        file.read_exact_at(&mut now, 0)?;
        let mut sim = self.sim.lock();
        let fid = Self::fid_of(&mut sim, file)?;
        let f = sim.files.entry(fid).or_default();
        match verdict {
            Verdict::Go => {
                drop(sim);
                if all {
                    file.sync_all()?;
                } else {
                    file.sync_data()?;
                }
                let mut sim = self.sim.lock();
                let f = sim.files.entry(fid).or_default();
                if let Some((pages, old)) = &f.lost {
                    for &p in pages {
                        let start = (p as usize * PAGE).min(now.len());
                        let end = (start + PAGE).min(now.len());
                        for (i, b) in now[start..end].iter_mut().enumerate() {
                            *b = old.get(start + i).copied().unwrap_or(0);
                        }
                    }
                }
                f.durable = now;
                Ok(())
            }
            Verdict::Fail(e) | Verdict::Short(_, e) => {
                let dirty = (0..now.len().div_ceil(PAGE)).filter(|&p| {
                    let r = p * PAGE..((p + 1) * PAGE).min(now.len());
                    f.durable.get(r.clone()) != Some(&now[r])
                });
                let dirty: Vec<u64> = dirty.map(|p| p as u64).collect();
                let lost = f
                    .lost
                    .get_or_insert_with(|| (std::collections::BTreeSet::new(), f.durable.clone()));
                lost.0.extend(dirty);
                Err(e)
            }
        }
    }
}

fn short(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl FileSystem for FaultFs {
    fn create_new(&self, path: &Path) -> io::Result<File> {
        self.go(Op::Create, path)?;
        let f = real::create_new(path)?;
        if self.tracked(path) {
            let ino = f.metadata()?.ino();
            Self::register(&mut self.sim.lock(), ino);
        }
        Ok(f)
    }

    fn open(&self, path: &Path) -> io::Result<File> {
        self.go(Op::Open, path)?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.go(Op::Read, path)?;
        std::fs::read(path)
    }

    fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.go(Op::Read, path)?;
        file.read_exact_at(buf, offset)
    }

    fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.tracked(path) && !buf.is_empty() {
            // Pages a write touches are dirty again: a later fsync writes them whole.
            let mut sim = self.sim.lock();
            let fid = Self::fid_of(&mut sim, file)?;
            if let Some((pages, _)) = sim.files.get_mut(&fid).and_then(|f| f.lost.as_mut()) {
                let first = offset / PAGE as u64;
                let last = (offset + buf.len() as u64 - 1) / PAGE as u64;
                pages.retain(|p| !(first..=last).contains(p));
            }
        }
        match self.before(Op::Write, path) {
            Verdict::Go => file.write_all_at(buf, offset),
            Verdict::Fail(e) => Err(e),
            Verdict::Short(keep, e) => {
                let keep = if keep == usize::MAX {
                    buf.len() / 2
                } else {
                    keep.min(buf.len())
                };
                file.write_all_at(&buf[..keep], offset)?;
                Err(e)
            }
        }
    }

    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        self.sync_file(file, path, false)
    }

    fn sync_all(&self, file: &File, path: &Path) -> io::Result<()> {
        self.sync_file(file, path, true)
    }

    fn set_len(&self, file: &File, path: &Path, len: u64) -> io::Result<()> {
        self.go(Op::SetLen, path)?;
        file.set_len(len)
    }

    fn allocate(&self, file: &File, path: &Path, len: u64) -> io::Result<()> {
        self.go(Op::Allocate, path)?;
        real::allocate(file, len)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.go(Op::Rename, to)?;
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.go(Op::Remove, path)?;
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.go(Op::SyncDir, dir)?;
        File::open(dir)?.sync_all()?;
        let canon = dir.canonicalize()?;
        if canon != self.dir {
            return Ok(());
        }
        // The directory's entries as they are now become the durable ones.
        let mut names = BTreeMap::new();
        let mut sim = self.sim.lock();
        for e in std::fs::read_dir(&canon)? {
            let e = e?;
            if !e.file_type()?.is_file() {
                continue;
            }
            let ino = e.metadata()?.ino();
            let fid = match sim.by_ino.get(&ino) {
                Some(&f) => f,
                None => Self::register(&mut sim, ino),
            };
            names.insert(e.file_name().to_string_lossy().into_owned(), fid);
        }
        sim.durable_names = names;
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        self.go(Op::List, dir)?;
        RealListing.list_dir(dir)
    }

    fn map(&self, file: &File, path: &Path) -> io::Result<Mmap> {
        self.go(Op::Map, path)?;
        crate::segment::map_sealed(file)
    }
}

/// The default listing, reachable from an override.
#[derive(Debug)]
struct RealListing;
impl FileSystem for RealListing {}

#[cfg(test)]
#[allow(clippy::many_single_char_names, reason = "short names in small tests")]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, FaultFs) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("old"), b"kept").unwrap();
        let fs = FaultFs::new(t.path()).unwrap();
        (t, fs)
    }

    #[test]
    fn unsynced_bytes_and_names_are_lost_at_a_power_cut() {
        let (t, fs) = setup();
        let p = t.path().canonicalize().unwrap().join("a");
        let f = fs.create_new(&p).unwrap();
        fs.write_at(&f, &p, b"hello", 0).unwrap();
        // Not in the directory yet: no directory fsync.
        assert!(!fs.crash_image().files.contains_key("a"));
        fs.sync_all(&f, &p).unwrap();
        fs.sync_dir(t.path()).unwrap();
        fs.write_at(&f, &p, b"HELLO world", 0).unwrap();
        let img = fs.crash_image();
        assert_eq!(img.files["a"], b"hello");
        assert_eq!(img.files["old"], b"kept");
        // An unlink the directory fsync did not cover comes back.
        fs.remove_file(&t.path().join("old")).unwrap();
        assert!(fs.crash_image().files.contains_key("old"));
        fs.sync_dir(t.path()).unwrap();
        assert!(!fs.crash_image().files.contains_key("old"));
    }

    #[test]
    fn a_failed_fsync_loses_its_data_even_if_a_retry_succeeds() {
        let (t, fs) = setup();
        let p = t.path().canonicalize().unwrap().join("a");
        let f = fs.create_new(&p).unwrap();
        fs.write_at(&f, &p, b"aaaa", 0).unwrap();
        fs.sync_data(&f, &p).unwrap();
        fs.sync_dir(t.path()).unwrap();
        fs.write_at(&f, &p, b"bbbb", 4).unwrap();
        fs.inject(Fault::nth(Op::Sync, 1, FaultKind::Io));
        assert_eq!(fs.sync_data(&f, &p).unwrap_err().raw_os_error(), Some(EIO));
        // Linux: the retry "succeeds", the page is clean, the bytes never reach disk.
        fs.sync_data(&f, &p).unwrap();
        assert_eq!(fs.crash_image().files["a"], b"aaaa\0\0\0\0");
        // A later write to another page does not bring it back.
        fs.write_at(&f, &p, b"cc", 4096).unwrap();
        fs.sync_data(&f, &p).unwrap();
        let img = &fs.crash_image().files["a"];
        assert_eq!(&img[..8], b"aaaa\0\0\0\0");
        assert_eq!(&img[4096..], b"cc");
        // A write to the lost page dirties it again: the next fsync writes it whole.
        fs.write_at(&f, &p, b"A", 0).unwrap();
        fs.sync_data(&f, &p).unwrap();
        assert_eq!(&fs.crash_image().files["a"][..8], b"Aaaabbbb");
    }

    #[test]
    fn faults_fire_on_the_nth_call_and_a_power_cut_stops_everything() {
        let (t, fs) = setup();
        let p = t.path().canonicalize().unwrap().join("a");
        let f = fs.create_new(&p).unwrap();
        fs.inject(Fault::nth(Op::Write, 2, FaultKind::ShortWrite { keep: 2 }));
        fs.write_at(&f, &p, b"xx", 0).unwrap();
        let e = fs.write_at(&f, &p, b"yyyy", 2).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(ENOSPC));
        assert_eq!(std::fs::read(&p).unwrap(), b"xxyy");
        fs.write_at(&f, &p, b"z", 4).unwrap();
        assert_eq!(fs.injected(), 1);
        let k = fs.calls() + 2;
        fs.crash_at(k);
        fs.write_at(&f, &p, b"1", 5).unwrap();
        assert!(fs.write_at(&f, &p, b"2345", 6).is_err());
        assert!(fs.crashed());
        assert!(fs.sync_dir(t.path()).is_err());
        assert!(fs.write_at(&f, &p, b"6789", 8).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"xxyyz123");
    }
}
