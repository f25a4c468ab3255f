//! The connection to the token, and how it is repaired when the token misbehaves.
//!
//! A [`Link`] is one usable state of the token: its slot, a logged-in anchor session
//! (login state belongs to the application, so every other session is logged in through
//! it) and the master KEK's handle, tagged with the module's *generation* (one per
//! C_Initialize). The [`Connection`] holds the current link, or none while the token is
//! unusable, and repairs it by itself, without a restart:
//!
//! - a failed job asks for the least repair its error calls for ([`HsmError::repair`]);
//!   one thread, `hsm-repair`, does it and retries every [`RETRY`] until it works;
//! - [`Repair::Check`] (a session died, a transient device error, a hung call): the
//!   anchor must still be logged in and the token must answer;
//! - [`Repair::Login`] (the token logged the application out, or the KEK's handle is
//!   gone): C_Login again, the KEK found again by its label; if the anchor session
//!   died, every session of the application did, so a new link of the next generation
//!   (a new anchor, logged in) replaces the current one without re-initialising;
//! - [`Repair::Reinitialize`] (the token went away, or a lesser repair failed):
//!   C_Finalize and C_Initialize of the module, the slot found again by the token's
//!   label, a new link of the next generation. SoftHSM only discovers tokens in
//!   C_Initialize, so a token directory moved away and back needs this.
//!
//! Jobs run holding the link's read lock, so re-initialisation waits for running calls
//! (a call hung inside the module delays it until it returns) and no job ever uses a
//! session or object handle of an earlier generation: workers drop such sessions
//! without closing them (the handle may already name a new session), and the key cache
//! forgets objects of earlier generations without destroying them.
//!
//! Each fault is logged once per episode: a warning when the first call meets it, a
//! line when the token works again; calls in between only at debug level. A PIN the
//! token refuses during a repair stops the repairs (retrying could lock the token).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;

use super::cache::KeyCache;
use super::token::{find_or_create_kek, find_slot_by_label, initialize, login};
use super::{HsmConfig, HsmError, PinSource};

/// How often a failed repair is tried again.
pub(crate) const RETRY: Duration = Duration::from_millis(500);

/// What it takes to make the token usable again, least first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Repair {
    None = 0,
    Check = 1,
    Login = 2,
    Reinitialize = 3,
}

impl Repair {
    fn from_u8(value: u8) -> Repair {
        match value {
            0 => Repair::None,
            1 => Repair::Check,
            2 => Repair::Login,
            _ => Repair::Reinitialize,
        }
    }
}

/// One usable state of the token, valid for one generation of the module.
pub(crate) struct Link {
    pub(crate) generation: u64,
    pub(crate) slot: Slot,
    /// Logged in; holds the application's login. Opened without close-on-drop, so a
    /// link of an earlier generation can be dropped without touching the module.
    anchor: Mutex<Option<Session>>,
    kek: Mutex<ObjectHandle>,
}

impl Link {
    pub(crate) fn kek(&self) -> ObjectHandle {
        *self.kek.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the anchor session, if it is open.
    pub(crate) fn with_anchor<T>(&self, f: impl FnOnce(&Session) -> T) -> Option<T> {
        self.anchor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(f)
    }

    /// Closes the anchor session (shutdown, or before C_Finalize).
    pub(crate) fn close_anchor(&self, logout: bool) {
        if let Some(anchor) = self.anchor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if logout && let Err(e) = anchor.logout() {
                tracing::debug!(error = %HsmError::from(e), "logout");
            }
            if let Err(e) = anchor.close() {
                tracing::debug!(error = %HsmError::from(e), "closing the anchor session");
            }
        }
    }
}

/// What is needed to open a link again.
struct Opener {
    token_label: String,
    pin: PinSource,
    kek_label: String,
}

pub(crate) struct Connection {
    pub(crate) ctx: Pkcs11,
    opener: Opener,
    current: RwLock<Option<Arc<Link>>>,
    generation: AtomicU64,
    needed: AtomicU8,
    pub(crate) cache: Arc<KeyCache>,
    /// Set at shutdown; the condition variable wakes the repair thread.
    stop: Mutex<bool>,
    wake: Condvar,
    /// When the current fault episode began, if one is under way.
    episode: Mutex<Option<Instant>>,
    /// The token refused the PIN during a repair: no more attempts.
    given_up: AtomicBool,
}

impl Connection {
    /// Opens the first link. Returns the connection and whether the KEK was created.
    pub(crate) fn open(
        ctx: Pkcs11,
        config: &HsmConfig,
        may_create_kek: bool,
        cache: Arc<KeyCache>,
    ) -> Result<(Connection, bool), HsmError> {
        initialize(&ctx)?;
        let connection = Connection {
            ctx,
            opener: Opener {
                token_label: config.token_label.clone(),
                pin: config.pin.clone(),
                kek_label: config.kek_label.clone(),
            },
            current: RwLock::new(None),
            generation: AtomicU64::new(1),
            needed: AtomicU8::new(0),
            cache,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            episode: Mutex::new(None),
            given_up: AtomicBool::new(false),
        };
        let (link, created) = connection.open_link(1, may_create_kek)?;
        *connection.write() = Some(Arc::new(link));
        Ok((connection, created))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Link>>> {
        self.current.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current link, or `None` while the token is being repaired.
    pub(crate) fn current(&self) -> Option<Arc<Link>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `f` with the current link, holding it so that no re-initialisation happens
    /// meanwhile; [`HsmError::Recovering`] while there is none.
    pub(crate) fn with_link<T>(
        &self,
        f: impl FnOnce(&Link) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        match current.as_deref() {
            Some(link) => f(link),
            None => Err(HsmError::Recovering),
        }
    }

    /// True while a repair is wanted or under way.
    pub(crate) fn repairing(&self) -> bool {
        self.needed.load(Ordering::Acquire) != Repair::None as u8
    }

    /// Asks for `repair` because of `cause`; the first request of an episode is logged.
    pub(crate) fn request(&self, repair: Repair, cause: &HsmError) {
        if repair == Repair::None {
            return;
        }
        let before = self.needed.fetch_max(repair as u8, Ordering::AcqRel);
        let mut episode = self.episode.lock().unwrap_or_else(|e| e.into_inner());
        if episode.is_none() {
            *episode = Some(Instant::now());
            tracing::warn!(
                error = %cause,
                "HSM fault: calls that need the token answer UNAVAILABLE until it is repaired"
            );
        } else {
            tracing::debug!(error = %cause, "HSM fault (episode under way)");
        }
        drop(episode);
        if before < repair as u8 {
            self.wake.notify_all();
        }
    }

    fn open_link(&self, generation: u64, may_create_kek: bool) -> Result<(Link, bool), HsmError> {
        let slot = find_slot_by_label(&self.ctx, &self.opener.token_label)?;
        let anchor = self.ctx.open_rw_session_no_drop(slot)?;
        let logged_in = self.opener.pin.read().and_then(|pin| login(&anchor, &pin));
        let found = logged_in
            .and_then(|()| find_or_create_kek(&anchor, &self.opener.kek_label, may_create_kek));
        match found {
            Ok((kek, created)) => Ok((
                Link {
                    generation,
                    slot,
                    anchor: Mutex::new(Some(anchor)),
                    kek: Mutex::new(kek),
                },
                created,
            )),
            Err(e) => {
                let _ = anchor.close();
                Err(e)
            }
        }
    }

    /// The anchor is open and logged in, and the token answers.
    fn check(&self, link: &Link) -> Result<(), HsmError> {
        let state = link
            .with_anchor(|anchor| anchor.get_session_info().ok().map(|i| i.session_state()))
            .flatten();
        if state != Some(SessionState::RwUser) {
            return self.log_in_again(link);
        }
        self.ctx.get_token_info(link.slot)?;
        Ok(())
    }

    /// C_Login again and the KEK found again; a link of the next generation if the
    /// anchor session died.
    fn log_in_again(&self, link: &Link) -> Result<(), HsmError> {
        let anchor = link.anchor.lock().unwrap_or_else(|e| e.into_inner());
        if anchor
            .as_ref()
            .is_none_or(|session| session.get_session_info().is_err())
        {
            drop(anchor);
            return self.relink();
        }
        let session = anchor.as_ref().expect("anchor checked");
        let pin = self.opener.pin.read()?;
        login(session, &pin)?;
        drop(pin);
        let (kek, _) = find_or_create_kek(session, &self.opener.kek_label, false)?;
        *link.kek.lock().unwrap_or_else(|e| e.into_inner()) = kek;
        // Objects unwrapped before the logout may no longer be usable.
        self.cache.clear();
        Ok(())
    }

    /// The anchor session died, and with it (the service never closes it) every session
    /// of the application: C_CloseAllSessions, or the token reset them. A link of the
    /// next generation, without re-initialising the module, so every worker drops its
    /// dead session unclosed and opens a new one before its next job, instead of each
    /// meeting its dead one with a caller's call (and none uses a handle the token may
    /// have given a new session). The dead anchor is not closed either, for the same
    /// reason.
    fn relink(&self) -> Result<(), HsmError> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let (link, _) = self.open_link(generation, false)?;
        // Waits for running jobs, like a re-initialisation.
        let old = self.write().replace(Arc::new(link));
        self.cache.clear();
        self.cache.set_generation(generation);
        drop(old);
        Ok(())
    }

    /// C_Finalize and C_Initialize, then a link of the next generation.
    fn reinitialize(&self) -> Result<(), HsmError> {
        // Waits for running jobs; new ones fail fast until the new link is in place.
        let old = self.write().take();
        self.cache.clear();
        if let Some(old) = old {
            old.close_anchor(false);
        }
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %HsmError::from(e), "C_Finalize before re-initialising");
        }
        initialize(&self.ctx)?;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.cache.set_generation(generation);
        let (link, _) = self.open_link(generation, false)?;
        *self.write() = Some(Arc::new(link));
        Ok(())
    }

    fn attempt(&self, repair: Repair) -> Result<(), HsmError> {
        let link = match (repair, self.current()) {
            (Repair::Reinitialize, _) | (_, None) => return self.reinitialize(),
            (_, Some(link)) => link,
        };
        match repair {
            Repair::Login => self.log_in_again(&link),
            _ => self.check(&link),
        }
    }

    /// The repair thread's loop; returns at shutdown.
    pub(crate) fn repair_loop(&self) {
        loop {
            {
                let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
                while !*stop && !self.repairing() {
                    stop = self
                        .wake
                        .wait_timeout(stop, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if *stop {
                    return;
                }
            }
            if self.given_up.load(Ordering::Acquire) {
                self.pause();
                continue;
            }
            let repair = Repair::from_u8(self.needed.load(Ordering::Acquire));
            match self.attempt(repair) {
                Ok(()) => {
                    if self
                        .needed
                        .compare_exchange(repair as u8, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.end_episode(repair);
                    }
                }
                Err(HsmError::PinIncorrect) => {
                    self.given_up.store(true, Ordering::Release);
                    tracing::error!(
                        "the token refused the PIN while logging in again; not retrying, as \
                         that could lock the token: fix the PIN and restart the service"
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?repair, "HSM repair failed; retrying");
                    // Whatever a lesser repair could not mend, re-initialising may.
                    self.needed
                        .fetch_max(Repair::Reinitialize as u8, Ordering::AcqRel);
                    self.pause();
                }
            }
        }
    }

    fn pause(&self) {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if !*stop {
            let _ = self.wake.wait_timeout(stop, RETRY);
        }
    }

    fn end_episode(&self, repair: Repair) {
        if let Some(began) = self
            .episode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            tracing::info!(
                ?repair,
                after_ms = began.elapsed().as_millis() as u64,
                "HSM usable again"
            );
        }
    }

    /// Stops the repair thread and closes the link; then C_Finalize.
    pub(crate) fn shutdown(&self) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
        self.cache.clear();
        if let Some(link) = self.write().take() {
            link.with_anchor(|anchor| self.cache.graveyard.destroy_all(anchor, link.generation));
            link.close_anchor(true);
        }
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::warn!(error = %HsmError::from(e), "C_Finalize");
        }
    }
}

/// A worker's session, tied to the generation it was opened in.
#[derive(Default)]
pub(crate) struct WorkerSession {
    session: Option<(u64, Session)>,
}

impl WorkerSession {
    /// The worker's session for `link`, opened now if it has none of this generation.
    pub(crate) fn session(&mut self, ctx: &Pkcs11, link: &Link) -> Result<&Session, HsmError> {
        if self
            .session
            .as_ref()
            .is_some_and(|(generation, _)| *generation != link.generation)
        {
            // Opened before C_Finalize: gone with it, and its handle number may name a
            // session of the new generation, so it is dropped unclosed.
            self.session = None;
        }
        if self.session.is_none() {
            self.session = Some((link.generation, ctx.open_rw_session_no_drop(link.slot)?));
        }
        Ok(&self.session.as_ref().expect("session just opened").1)
    }

    /// Closes the session (it broke); the next job opens a new one. Call holding the
    /// link the session belongs to.
    pub(crate) fn discard(&mut self) {
        if let Some((_, session)) = self.session.take() {
            // Closing a dead session may fail too; nothing more can be done with it.
            let _ = session.close();
        }
    }

    /// Closes the session at the worker's end, if it belongs to `generation`.
    pub(crate) fn close_if_current(&mut self, generation: Option<u64>) {
        if let Some((opened_in, session)) = self.session.take()
            && Some(opened_in) == generation
            && let Err(e) = session.close()
        {
            tracing::debug!(error = %HsmError::from(e), "closing a pooled session");
        }
    }
}
