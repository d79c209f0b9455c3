//! Memory for key material: locked in RAM (`mlock`, never swapped out), left out of core
//! dumps (`MADV_DONTDUMP`) and zeroed in forked children (`MADV_WIPEONFORK`), where the
//! OS allows; wiped when a key is dropped. A key's bytes pass through the stack on their
//! way in (generation, unwrap, ring's key expansion); those transient copies are not
//! under this module's control.
//!
//! Keys live in fixed 1 KiB slots carved from 64 KiB chunks that are allocated once and
//! never returned to the allocator (so a slot's memory is never handed to other code,
//! and a dropped key's slot is wiped before reuse). If `mlock` is refused (for example by
//! `RLIMIT_MEMLOCK`), keys still work; [`status`] says what the OS granted.

use std::marker::PhantomData;
use std::ptr::NonNull;

use parking_lot::Mutex;

/// Bytes per key slot (an expanded ChaCha20-Poly1305 key fits with room to spare).
pub const SLOT: usize = 1024;
/// Bytes allocated, locked and marked at a time (at least one page).
const CHUNK: usize = 64 << 10;

struct Arena {
    /// Addresses of free slots.
    free: Vec<usize>,
    /// Bytes of chunks allocated.
    reserved: usize,
    in_use: usize,
    locked: bool,
    dontdump: bool,
    error: Option<String>,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    free: Vec::new(),
    reserved: 0,
    in_use: 0,
    locked: true,
    dontdump: true,
    error: None,
});

/// What the OS granted for key memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMemoryStatus {
    /// Key slots in use (data keys, expanded keys, the master key).
    pub slots_in_use: usize,
    /// Bytes reserved for key slots.
    pub bytes_reserved: usize,
    /// Every chunk is locked in RAM (`mlock`).
    pub locked: bool,
    /// Every chunk is excluded from core dumps (`MADV_DONTDUMP`).
    pub excluded_from_core_dumps: bool,
    /// Why locking or marking failed, if it did.
    pub error: Option<String>,
}

/// The state of key memory.
pub fn status() -> KeyMemoryStatus {
    let a = ARENA.lock();
    KeyMemoryStatus {
        slots_in_use: a.in_use,
        bytes_reserved: a.reserved,
        locked: a.reserved > 0 && a.locked,
        excluded_from_core_dumps: a.reserved > 0 && a.dontdump,
        error: a.error.clone(),
    }
}

/// Turns core dumps off for the whole process: `RLIMIT_CORE` = 0 and not dumpable
/// (`PR_SET_DUMPABLE` 0, which also keeps other processes of the same user from
/// attaching a debugger). `Options::core_dumps = CoreDumps::Disable` calls it at open.
pub fn disable_core_dumps() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[expect(unsafe_code, reason = "setrlimit and prctl for this process")]
    // SAFETY: plain system calls on this process with a valid rlimit value.
    let (r, p) = unsafe {
        (
            libc::setrlimit(libc::RLIMIT_CORE, std::ptr::from_ref(&zero)),
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
        )
    };
    if r != 0 || p != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn take_slot() -> NonNull<u8> {
    let mut a = ARENA.lock();
    if a.free.is_empty() {
        grow(&mut a);
    }
    a.in_use += 1;
    let addr = a.free.pop().expect("grow added slots");
    NonNull::new(addr as *mut u8).expect("slot addresses are never null")
}

/// The OS page size (madvise and mlock work on whole pages).
fn page_size() -> usize {
    #[expect(unsafe_code, reason = "sysconf")]
    // SAFETY: sysconf reads a system constant; no memory is involved.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

fn grow(a: &mut Arena) {
    let page = page_size();
    let chunk = CHUNK.max(page);
    let layout = std::alloc::Layout::from_size_align(chunk, page).expect("valid layout");
    #[expect(unsafe_code, reason = "allocating the key arena")]
    // SAFETY: the layout has a non-zero size. The chunk is never deallocated, so slot
    // pointers into it stay valid for the life of the process.
    let base = unsafe { std::alloc::alloc_zeroed(layout) };
    if base.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    #[expect(unsafe_code, reason = "mlock and madvise on memory this module owns")]
    // SAFETY: `base..base + chunk` is a live, page-aligned allocation owned by the arena;
    // mlock and madvise change only its paging, dump and fork attributes.
    let (lock_rc, dump_rc) = unsafe {
        // A forked child gets zeros here instead of the keys (Linux ≥ 4.14; best effort).
        let _ = libc::madvise(base.cast(), chunk, libc::MADV_WIPEONFORK);
        (
            libc::mlock(base.cast(), chunk),
            libc::madvise(base.cast(), chunk, libc::MADV_DONTDUMP),
        )
    };
    if lock_rc != 0 {
        a.locked = false;
        a.error = Some(format!(
            "mlock of key memory refused: {} (raise RLIMIT_MEMLOCK)",
            std::io::Error::last_os_error()
        ));
    }
    if dump_rc != 0 {
        a.dontdump = false;
        a.error = Some(format!(
            "madvise(MADV_DONTDUMP) of key memory refused: {}",
            std::io::Error::last_os_error()
        ));
    }
    a.reserved += chunk;
    let base = base as usize;
    a.free
        .extend((0..chunk / SLOT).rev().map(|i| base + i * SLOT));
}

fn return_slot(p: NonNull<u8>) {
    #[expect(unsafe_code, reason = "wiping a key slot")]
    // SAFETY: `p` is the start of a SLOT-byte slot of the arena (never deallocated), no
    // longer referenced by its box; volatile writes keep the wipe from being optimised out.
    unsafe {
        for i in 0..SLOT {
            std::ptr::write_volatile(p.as_ptr().add(i), 0);
        }
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    let mut a = ARENA.lock();
    a.in_use -= 1;
    #[cfg(test)]
    if tests::QUARANTINE.with(std::cell::Cell::get) {
        return; // kept out of reuse so the test can look at it
    }
    a.free.push(p.as_ptr() as usize);
}

/// A value in locked, dump-excluded memory, wiped when dropped.
pub struct LockedBox<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: a LockedBox owns its T exclusively, like a Box.
#[expect(unsafe_code, reason = "LockedBox is a Box-like owner")]
unsafe impl<T: Send> Send for LockedBox<T> {}
// SAFETY: shared references only hand out `&T`.
#[expect(unsafe_code, reason = "LockedBox is a Box-like owner")]
unsafe impl<T: Sync> Sync for LockedBox<T> {}

impl<T> LockedBox<T> {
    const FITS: () = assert!(
        std::mem::size_of::<T>() <= SLOT && std::mem::align_of::<T>() <= SLOT,
        "type too large for a key slot"
    );

    pub fn new(v: T) -> Self {
        let () = Self::FITS;
        let slot = take_slot().cast::<T>();
        #[expect(unsafe_code, reason = "moving a value into its key slot")]
        // SAFETY: the slot is SLOT bytes, SLOT-aligned (chunks are page-aligned and slots
        // are SLOT apart), unused, and FITS checks that T fits in size and alignment.
        unsafe {
            slot.as_ptr().write(v);
        }
        LockedBox {
            ptr: slot,
            _owns: PhantomData,
        }
    }

    /// The slot's address (tests check that it is wiped after drop).
    #[cfg(test)]
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl<T> std::fmt::Debug for LockedBox<T> {
    /// Never shows the contents: they are key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockedBox(<redacted>)")
    }
}

impl<T> std::ops::Deref for LockedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        #[expect(unsafe_code, reason = "reading the boxed value")]
        // SAFETY: `ptr` points to an initialised T owned by this box until drop.
        unsafe {
            self.ptr.as_ref()
        }
    }
}

impl<T> std::ops::DerefMut for LockedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        #[expect(unsafe_code, reason = "writing the boxed value")]
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe {
            self.ptr.as_mut()
        }
    }
}

impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        #[expect(unsafe_code, reason = "dropping the boxed value in place")]
        // SAFETY: the value is initialised and dropped exactly once, here.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
        }
        return_slot(self.ptr.cast());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Slots freed on this thread are not reused (other test threads would refill
        /// them before the wipe could be checked).
        pub(super) static QUARANTINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The `VmFlags` and `Locked:` lines of the /proc/self/smaps entry holding `addr`.
    fn smaps_of(addr: usize) -> Option<(String, u64)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        let (mut flags, mut locked) = (None, None);
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        if inside {
                            break;
                        }
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("VmFlags:") {
                    flags = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("Locked:") {
                    locked = v.trim().trim_end_matches(" kB").trim().parse().ok();
                }
            }
        }
        Some((flags?, locked?))
    }

    #[test]
    fn keys_live_in_locked_undumpable_memory_and_are_wiped_on_drop() {
        let b = LockedBox::new([0xa5u8; 32]);
        let addr = b.addr();
        assert_eq!(*b, [0xa5; 32]);
        let st = status();
        assert!(st.slots_in_use >= 1);
        // MADV_DONTDUMP exists on every Linux this builds for; mlock depends on the
        // memlock limit, so the kernel's view must agree with what status() reports.
        assert!(st.excluded_from_core_dumps, "{st:?}");
        let (flags, locked_kb) = smaps_of(addr).expect("the key arena in /proc/self/smaps");
        assert!(flags.split(' ').any(|f| f == "dd"), "VmFlags {flags}");
        assert_eq!(locked_kb > 0, st.locked, "Locked: {locked_kb} kB, {st:?}");
        QUARANTINE.with(|q| q.set(true));
        drop(b);
        QUARANTINE.with(|q| q.set(false));
        #[expect(unsafe_code, reason = "reading a wiped slot of the arena")]
        // SAFETY: the arena's chunks are never deallocated, so the slot is still mapped
        // memory of this process; it holds plain bytes.
        let after = unsafe { std::slice::from_raw_parts(addr as *const u8, SLOT).to_vec() };
        assert!(after.iter().all(|&x| x == 0), "slot not wiped");
    }
}
