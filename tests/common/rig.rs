//! A data dir for fault and crash tests: two master keys (one for a rotation), a manual
//! clock, small segments, maintenance driven by hand, and an optional `FaultFs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cinder::vfs::FaultFs;
use cinder::{Durability, FileKeyProvider, KeyProvider, ManualClock, Options};

pub const START_MS: u64 = 1_770_000_000_000;

pub struct Rig {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub key1: Arc<FileKeyProvider>,
    pub key2: Arc<FileKeyProvider>,
    pub clock: Arc<ManualClock>,
    pub mode: Durability,
    pub deadline: Duration,
    /// A fault-injecting file system over `dir`, made with the rig.
    pub fs: Arc<FaultFs>,
}

impl Rig {
    pub fn new(mode: Durability, deadline: Duration) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key1 = Arc::new(FileKeyProvider::create(tmp.path().join("key1")).unwrap());
        let key2 = Arc::new(FileKeyProvider::create(tmp.path().join("key2")).unwrap());
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let fs = Arc::new(FaultFs::new(&dir).unwrap());
        Rig {
            fs,
            _tmp: tmp,
            dir,
            key1,
            key2,
            clock: ManualClock::new(START_MS),
            mode,
            deadline,
        }
    }

    /// Options over `fs` (the real file system if `None`); `rotated`: the workload
    /// started rotating to `key2`, so open with it and `key1` as the previous key.
    pub fn options(&self, fs: Option<Arc<FaultFs>>, rotated: bool) -> Options {
        let mut o = Options::new(if rotated {
            self.key2.clone()
        } else {
            self.key1.clone()
        });
        if rotated {
            o.previous_key_provider = Some(self.key1.clone());
        }
        o.segment_size = 64 << 10;
        o.max_message_size = 4096;
        o.max_shred_delay = self.deadline;
        o.durability = self.mode;
        o.clock = self.clock.clone();
        o.background_reaper = false;
        o.zero_fill_segments = false;
        if let Some(fs) = fs {
            o.file_system = fs;
        }
        o
    }

    /// Options over the rig's own `FaultFs`.
    pub fn faulty(&self) -> Options {
        self.options(Some(self.fs.clone()), false)
    }

    /// Options over the real file system.
    pub fn real(&self) -> Options {
        self.options(None, false)
    }

    /// Empties the data dir and sets the clock back to the start, for the next run.
    pub fn reset(&self) {
        for e in std::fs::read_dir(&self.dir).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        self.clock.set(START_MS);
    }

    pub fn keys(&self) -> [&dyn KeyProvider; 2] {
        [&*self.key1, &*self.key2]
    }
}
