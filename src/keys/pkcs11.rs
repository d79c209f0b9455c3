//! A PKCS#11 (HSM) key provider with shred epochs.
//!
//! Data keys are wrapped (AES-256-GCM, `C_Encrypt`) by *epoch keys* that live only in the
//! token: one per epoch (default one hour), generated in the token as sensitive,
//! non-extractable token objects. A key is wrapped in the epoch current when it is made,
//! and once that epoch is over the store re-wraps every key still live into the current
//! one (`Keyring::roll_epochs`), so no long-lived key keeps an old epoch alive. An epoch
//! no live key (nor the keystore on disk) is wrapped in any more, once over, has its key
//! destroyed in the token (`C_DestroyObject`): from then on no copy of what it wrapped — an
//! old keystore, a backup, a disk image — can be opened by anyone, the HSM's owner
//! included.
//!
//! Calls happen per segment (create, open, shred), never per message.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use parking_lot::Mutex;

use super::KeyProvider;
use crate::crypto::{self, Dek, KEY_LEN};
use crate::error::{Error, HsmFailure, Result};
use crate::options::Clock;

/// Where the user PIN comes from: never the command line, never a log.
#[derive(Clone)]
pub enum PinSource {
    /// A file holding the PIN (one trailing newline ignored); it must not be readable by
    /// group or others.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl std::fmt::Debug for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "PinSource::File({})", p.display()),
            PinSource::Env(v) => write!(f, "PinSource::Env({v})"),
        }
    }
}

/// How to reach the token.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token, by label (slot numbers change between runs on SoftHSM).
    pub token_label: String,
    pub pin: PinSource,
    /// Prefix of the epoch keys' labels in the token (one store per prefix).
    pub key_label: String,
    /// Length of an epoch (default one hour): a shredded segment's data key becomes
    /// unopenable everywhere once the epoch of its shred is over and the next maintenance
    /// pass has moved the live keys out of it (see engine-format.md for the bound).
    pub epoch: Duration,
    /// Time source for epochs (the store's clock in tests).
    pub clock: Arc<dyn Clock>,
}

impl Pkcs11Config {
    pub fn new(module: impl Into<PathBuf>, token_label: &str, pin: PinSource) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            key_label: "cinder".into(),
            epoch: Duration::from_secs(3600),
            clock: Arc::new(crate::options::SystemClock),
        }
    }
}

/// Keys the PIN hashes below: a secret of this process only, so a hash kept in memory
/// cannot be brute-forced into a short PIN without it.
static PIN_KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();

/// Keyed hashes of the PINs this process logged in with, by token (see `login`).
static LOGINS: Mutex<std::collections::BTreeMap<String, [u8; 32]>> =
    Mutex::new(std::collections::BTreeMap::new());

/// Wrapped key layout: version (1) ‖ epoch (8) ‖ GCM IV (12) ‖ ciphertext (32) ‖ tag (16).
const WRAP_VERSION: u8 = 1;
const IV_LEN: usize = 12;
pub const WRAPPED_LEN: usize = 1 + 8 + IV_LEN + KEY_LEN + 16;

struct Conn {
    session: Session,
    /// Epoch → key handle, for this session.
    keys: HashMap<u64, ObjectHandle>,
}

/// A key provider whose key-encryption keys never leave a PKCS#11 token.
pub struct Pkcs11KeyProvider {
    cfg: Pkcs11Config,
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    pin_check: [u8; 32],
    conn: Mutex<Conn>,
    id: u64,
}

impl std::fmt::Debug for Pkcs11KeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyProvider")
            .field("module", &self.cfg.module)
            .field("token", &self.cfg.token_label)
            .field("key_label", &self.cfg.key_label)
            .field("kek_id", &format_args!("{:016x}", self.id))
            .finish_non_exhaustive()
    }
}

fn hsm(kind: HsmFailure, e: impl std::fmt::Display) -> Error {
    Error::Hsm {
        kind,
        detail: e.to_string(),
    }
}

fn ck(e: &CkError) -> Error {
    let kind = match e {
        CkError::LibraryLoading(_) => HsmFailure::Module,
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _) => HsmFailure::WrongPin,
        // Cached key handles go stale with the login: treated like a lost session (the
        // retry reopens it and looks the key up again).
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::UserNotLoggedIn
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid,
            _,
        ) => HsmFailure::SessionLost,
        _ => HsmFailure::Operation,
    };
    hsm(kind, e)
}

/// The PIN, and a keyed hash of it to compare logins with (see `login`).
fn read_pin(src: &PinSource) -> Result<(AuthPin, [u8; 32])> {
    let s = match src {
        PinSource::Env(v) => std::env::var(v)
            .map_err(|_| hsm(HsmFailure::WrongPin, format!("PIN variable {v} is not set")))?,
        PinSource::File(p) => {
            let b = crate::fsutil::read_secret(p)?;
            String::from_utf8(b.to_vec())
                .map_err(|_| hsm(HsmFailure::WrongPin, "the PIN file is not UTF-8"))?
        }
    };
    let key = PIN_KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        let _ = crypto::fill_random(&mut k);
        k
    });
    let check = *blake3::keyed_hash(key, s.as_bytes()).as_bytes();
    Ok((AuthPin::new(s.into()), check))
}

impl Pkcs11KeyProvider {
    /// Loads the module, finds the token by label, opens a session and logs in.
    pub fn open(cfg: Pkcs11Config) -> Result<Self> {
        if cfg.epoch < Duration::from_secs(1) {
            return Err(Error::InvalidOptions(
                "HSM epoch must be at least 1 s".into(),
            ));
        }
        let ctx = Pkcs11::new(&cfg.module).map_err(|e| ck(&e))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck(&e)),
        }
        let mut slot = None;
        for s in ctx.get_slots_with_token().map_err(|e| ck(&e))? {
            if ctx.get_token_info(s).map_err(|e| ck(&e))?.label() == cfg.token_label {
                slot = Some(s);
                break;
            }
        }
        let slot = slot.ok_or_else(|| {
            hsm(
                HsmFailure::TokenNotFound,
                format!("no token labelled {:?}", cfg.token_label),
            )
        })?;
        let (pin, pin_check) = read_pin(&cfg.pin)?;
        let session = Self::login((&ctx, &cfg.module), slot, (&pin, pin_check))?;
        let id = {
            let h = blake3::Hasher::new_derive_key("cinder v1 pkcs11 kek id")
                .update(cfg.token_label.as_bytes())
                .update(&[0])
                .update(cfg.key_label.as_bytes())
                .finalize();
            u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
        };
        Ok(Pkcs11KeyProvider {
            cfg,
            ctx,
            slot,
            pin,
            pin_check,
            conn: Mutex::new(Conn {
                session,
                keys: HashMap::new(),
            }),
            id,
        })
    }

    /// Opens a session and logs in. The login state is per process and token: if this
    /// process is logged in already, the token does not check the PIN again
    /// (`CKR_USER_ALREADY_LOGGED_IN`), so the PIN is compared with the one that logged
    /// in (kept as a keyed hash): a wrong PIN is refused now, not at the next restart.
    /// A login made by other code in the process, outside cinder, cannot be checked.
    fn login(
        (ctx, module): (&Pkcs11, &std::path::Path),
        slot: Slot,
        (pin, check): (&AuthPin, [u8; 32]),
    ) -> Result<Session> {
        let session = ctx.open_rw_session(slot).map_err(|e| ck(&e))?;
        // Token labels need not be unique: the token is named by its module's path and
        // its serial number too.
        let info = ctx.get_token_info(slot).map_err(|e| ck(&e))?;
        let label = format!(
            "{}\0{}\0{}",
            module.display(),
            info.serial_number(),
            info.label()
        );
        let mut logins = LOGINS.lock();
        match session.login(UserType::User, Some(pin)) {
            Ok(()) => {
                logins.insert(label, check);
                Ok(session)
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => match logins.get(&label) {
                Some(known) if *known != check => Err(hsm(
                    HsmFailure::WrongPin,
                    "the token is logged in by this process with another PIN",
                )),
                _ => Ok(session),
            },
            Err(e) => Err(ck(&e)),
        }
    }

    /// Runs `f` on the session; a lost session is reopened (and logged in) once.
    fn with_session<T>(&self, f: impl Fn(&mut Conn) -> Result<T>) -> Result<T> {
        let mut c = self.conn.lock();
        match f(&mut c) {
            Err(Error::Hsm {
                kind: HsmFailure::SessionLost,
                ..
            }) => {
                c.session = Self::login(
                    (&self.ctx, &self.cfg.module),
                    self.slot,
                    (&self.pin, self.pin_check),
                )?;
                c.keys.clear();
                f(&mut c)
            }
            r => r,
        }
    }

    fn label(&self, epoch: u64) -> String {
        format!("{}-epoch-{epoch}", self.cfg.key_label)
    }

    fn current_epoch(&self) -> u64 {
        self.cfg.clock.now_ms() / (self.cfg.epoch.as_millis() as u64).max(1)
    }

    /// The epoch key's handle; generated in the token if `create` and it does not exist.
    fn epoch_key(&self, c: &mut Conn, epoch: u64, create: bool) -> Result<Option<ObjectHandle>> {
        if let Some(&h) = c.keys.get(&epoch) {
            return Ok(Some(h));
        }
        let label = self.label(epoch).into_bytes();
        let found = c
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.clone()),
            ])
            .map_err(|e| ck(&e))?;
        if found.is_empty() {
            // Private objects are invisible to a session that lost its login: that is a
            // lost session, not a destroyed key.
            let state = c
                .session
                .get_session_info()
                .map_err(|e| ck(&e))?
                .session_state();
            if state != SessionState::RwUser {
                return Err(hsm(HsmFailure::SessionLost, "the session is not logged in"));
            }
        }
        let h = match found.first() {
            Some(&h) => h,
            None if create => c
                .session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        // No copy of it can be made (a copy would outlive its
                        // destruction) and its policy cannot be changed later; it
                        // stays destroyable (that is how it is shredded).
                        Attribute::Copyable(false),
                        Attribute::Modifiable(false),
                        Attribute::Destroyable(true),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::ValueLen(32.into()),
                        Attribute::Label(label),
                    ],
                )
                .map_err(|e| ck(&e))?,
            None => return Ok(None),
        };
        c.keys.insert(epoch, h);
        Ok(Some(h))
    }

    /// Logs this application out of the token (every session of the process loses its
    /// login, as after a token reset); the provider logs back in on its next call.
    pub fn logout(&self) -> Result<()> {
        self.conn.lock().session.logout().map_err(|e| ck(&e))
    }

    /// The protection attributes of an epoch key in the token (for audits):
    /// `(sensitive, extractable, copyable, modifiable)`; `None` if it does not exist.
    pub fn epoch_key_policy(&self, epoch: u64) -> Result<Option<(bool, bool, bool, bool)>> {
        self.with_session(|c| {
            let Some(h) = self.epoch_key(c, epoch, false)? else {
                return Ok(None);
            };
            let attrs = c
                .session
                .get_attributes(
                    h,
                    &[
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::Copyable,
                        AttributeType::Modifiable,
                    ],
                )
                .map_err(|e| ck(&e))?;
            let mut p = (false, true, true, true);
            for a in attrs {
                match a {
                    Attribute::Sensitive(v) => p.0 = v,
                    Attribute::Extractable(v) => p.1 = v,
                    Attribute::Copyable(v) => p.2 = v,
                    Attribute::Modifiable(v) => p.3 = v,
                    _ => {}
                }
            }
            Ok(Some(p))
        })
    }

    /// Epochs whose keys exist in the token.
    pub fn epochs(&self) -> Result<Vec<u64>> {
        let prefix = format!("{}-epoch-", self.cfg.key_label);
        self.with_session(|c| {
            let handles = c
                .session
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(|e| ck(&e))?;
            let mut out = Vec::new();
            for h in handles {
                let attrs = c
                    .session
                    .get_attributes(h, &[AttributeType::Label])
                    .map_err(|e| ck(&e))?;
                for a in attrs {
                    if let Attribute::Label(l) = a {
                        if let Some(n) = String::from_utf8_lossy(&l)
                            .strip_prefix(&prefix)
                            .and_then(|n| n.parse().ok())
                        {
                            out.push(n);
                        }
                    }
                }
            }
            out.sort_unstable();
            Ok(out)
        })
    }

    fn epoch_in(wrapped: &[u8]) -> Option<u64> {
        (wrapped.len() == WRAPPED_LEN && wrapped[0] == WRAP_VERSION)
            .then(|| u64::from_le_bytes(wrapped[1..9].try_into().expect("8 bytes")))
    }
}

impl Pkcs11KeyProvider {
    /// Destroys every epoch key of this provider's label that `keep` does not keep,
    /// pushing each epoch onto `destroyed` once it is gone.
    fn destroy_epochs(&self, keep: impl Fn(u64) -> bool, destroyed: &mut Vec<u64>) -> Result<()> {
        for epoch in self.epochs()? {
            if keep(epoch) {
                continue;
            }
            self.with_session(|c| {
                if let Some(h) = self.epoch_key(c, epoch, false)? {
                    c.session.destroy_object(h).map_err(|e| ck(&e))?;
                }
                c.keys.remove(&epoch);
                Ok(())
            })?;
            destroyed.push(epoch);
        }
        Ok(())
    }
}

impl KeyProvider for Pkcs11KeyProvider {
    fn kek_id(&self) -> u64 {
        self.id
    }

    fn wrap(&self, dek: &Dek, context: &[u8]) -> Result<Vec<u8>> {
        let epoch = self.current_epoch();
        self.with_session(|c| {
            let key = self.epoch_key(c, epoch, true)?.expect("created");
            let mut iv = [0u8; IV_LEN];
            crypto::fill_random(&mut iv)?;
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, context, 128.into()).map_err(|e| ck(&e))?;
            let ct = c
                .session
                .encrypt(&Mechanism::AesGcm(params), key, dek.expose())
                .map_err(|e| ck(&e))?;
            let mut out = Vec::with_capacity(WRAPPED_LEN);
            out.push(WRAP_VERSION);
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(&iv);
            out.extend_from_slice(&ct);
            if out.len() != WRAPPED_LEN {
                return Err(hsm(
                    HsmFailure::Operation,
                    "unexpected AES-GCM output length",
                ));
            }
            Ok(out)
        })
    }

    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Option<Dek>> {
        let Some(epoch) = Self::epoch_in(wrapped) else {
            return Ok(None);
        };
        self.with_session(|c| {
            let Some(key) = self.epoch_key(c, epoch, false)? else {
                return Err(hsm(
                    HsmFailure::EpochKeyDestroyed,
                    format!("the key of epoch {epoch} was destroyed: what it wrapped is shredded"),
                ));
            };
            let mut iv = [0u8; IV_LEN];
            iv.copy_from_slice(&wrapped[9..9 + IV_LEN]);
            let params = GcmParams::new(&mut iv, context, 128.into()).map_err(|e| ck(&e))?;
            match c
                .session
                .decrypt(&Mechanism::AesGcm(params), key, &wrapped[9 + IV_LEN..])
            {
                Ok(pt) if pt.len() == KEY_LEN => {
                    let mut k = zeroize::Zeroizing::new([0u8; KEY_LEN]);
                    k.copy_from_slice(&pt);
                    let mut pt = pt;
                    zeroize::Zeroize::zeroize(&mut pt);
                    Ok(Some(Dek::from_bytes(&k)))
                }
                Ok(_)
                | Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )) => Ok(None),
                Err(e) => Err(ck(&e)),
            }
        })
    }

    fn epoch_of(&self, wrapped: &[u8]) -> Option<u64> {
        Self::epoch_in(wrapped)
    }

    fn current_epoch(&self) -> Option<u64> {
        Some(Pkcs11KeyProvider::current_epoch(self))
    }

    fn retire(&self, live: &[&[u8]], destroyed: &mut Vec<u64>) -> Result<()> {
        let current = self.current_epoch();
        let keep: BTreeSet<u64> = live.iter().filter_map(|w| Self::epoch_in(w)).collect();
        self.destroy_epochs(|e| e >= current || keep.contains(&e), destroyed)
    }

    fn retire_all(&self, destroyed: &mut Vec<u64>) -> Result<()> {
        self.destroy_epochs(|_| false, destroyed)
    }
}
