//! A per-thread memo of the session cookies seen lately. A signed-in browser sends the same
//! sealed cookie with every request; opening it (AES-256-GCM, JSON) and signing the workers'
//! assertion (JSON, HMAC-SHA256) cost about 3 µs a request, the largest part of what the
//! session check adds. Envoy's `jwt_authn` keeps verified tokens for the same reason.
//!
//! A recalled answer is the one a fresh check would give:
//! - it is found only for the exact sealed bytes, under the same keys: entries belong to one
//!   [`SessionCache`], which belongs to one config generation (a reload starts afresh);
//! - expiry is checked against the clock on every request;
//! - an assertion is reused only within the second it was signed for: signing again in that
//!   second would give the same bytes (HMAC is deterministic, its times are whole seconds).
//!
//! Failed checks are not kept: they are cheap, and clients must not be able to fill the memo.
//! Cookies are compared in constant time.
//! It is direct-mapped, [`SLOTS`] entries per thread (a collision replaces the older entry),
//! indexed by a hash keyed per thread so that one client cannot aim at another's slot. No locks:
//! a proxy worker is one thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderValue;

use super::session::{Session, SessionError};

/// Entries per thread: enough for the signed-in clients of a busy worker to stay in; at most a
/// few hundred KiB per thread (a sealed cookie, a session and an assertion each).
pub const SLOTS: usize = 256;

/// A signed-in request, verified: whose it is, and the assertion that tells the workers.
#[derive(Clone, Debug)]
pub struct Verified {
    pub session: Arc<Session>,
    /// The signed identity assertion for this second (`custodia_identity::IDENTITY_HEADER`).
    pub assertion: HeaderValue,
    /// The session's subject and email as header values, made once per session seen (a
    /// value is checked and copied when made); `None` when either cannot be one.
    pub forwarded: Option<ForwardedIdentity>,
}

/// What `X-Forwarded-User` and `X-Forwarded-Email` say for a session.
#[derive(Clone, Debug)]
pub struct ForwardedIdentity {
    pub user: HeaderValue,
    pub email: Option<HeaderValue>,
}

impl ForwardedIdentity {
    /// `None` when the subject or the email is not a valid header value.
    pub fn of(session: &Session) -> Option<ForwardedIdentity> {
        Some(ForwardedIdentity {
            user: HeaderValue::from_str(&session.sub).ok()?,
            email: match &session.email {
                Some(email) => Some(HeaderValue::from_str(email).ok()?),
                None => None,
            },
        })
    }
}

/// The memo of one config generation (see the module docs).
#[derive(Debug)]
pub struct SessionCache {
    generation: u64,
}

impl Default for SessionCache {
    fn default() -> SessionCache {
        SessionCache::new()
    }
}

/// Hands out generations; entries of one cache never answer for another.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

struct Entry {
    generation: u64,
    sealed: Box<[u8]>,
    session: Arc<Session>,
    /// The second `assertion` was signed for.
    signed_for: u64,
    assertion: HeaderValue,
    forwarded: Option<ForwardedIdentity>,
}

struct Memo {
    /// This thread's key for [`Memo::slot_of`].
    seed: u64,
    slots: Vec<Option<Entry>>,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo {
        seed: fastrand::u64(..),
        slots: (0..SLOTS).map(|_| None).collect(),
    });
}

impl SessionCache {
    pub fn new() -> SessionCache {
        SessionCache {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The verified session sealed in `sealed`, at `now` (unix seconds). `open` opens and
    /// checks it from scratch (decryption, expiry); `sign` makes the assertion for a session at
    /// a given second. Each is called only when the memo cannot answer.
    pub fn verify(
        &self,
        sealed: &[u8],
        now: u64,
        open: impl FnOnce() -> Result<Session, SessionError>,
        sign: impl Fn(&Session, u64) -> HeaderValue,
    ) -> Result<Verified, SessionError> {
        let recalled = MEMO.try_with(|memo| {
            // Never contended (nothing below calls back in); `None` falls back to a fresh check.
            let mut memo = memo.try_borrow_mut().ok()?;
            let slot = memo.slot_of(sealed);
            let entry = memo.slots.get_mut(slot)?.as_mut()?;
            if entry.generation != self.generation || !same_bytes(&entry.sealed, sealed) {
                return None;
            }
            if entry.session.expired_at(now) {
                return Some(Err(SessionError::Expired));
            }
            if entry.signed_for != now {
                entry.assertion = sign(&entry.session, now);
                entry.signed_for = now;
            }
            Some(Ok(Verified {
                session: entry.session.clone(),
                assertion: entry.assertion.clone(),
                forwarded: entry.forwarded.clone(),
            }))
        });
        if let Ok(Some(answer)) = recalled {
            return answer;
        }
        let session = Arc::new(open()?);
        let assertion = sign(&session, now);
        let forwarded = ForwardedIdentity::of(&session);
        let verified = Verified {
            session: session.clone(),
            assertion: assertion.clone(),
            forwarded: forwarded.clone(),
        };
        let _ = MEMO.try_with(|memo| {
            if let Ok(mut memo) = memo.try_borrow_mut() {
                let slot = memo.slot_of(sealed);
                if let Some(place) = memo.slots.get_mut(slot) {
                    *place = Some(Entry {
                        generation: self.generation,
                        sealed: sealed.into(),
                        session,
                        signed_for: now,
                        assertion,
                        forwarded,
                    });
                }
            }
        });
        Ok(verified)
    }
}

/// Equal, without an early exit: how long a mismatch takes must not tell a client how much of
/// another client's cookie it guessed. (`subtle`'s byte-at-a-time compare costs ~0.5 µs over a
/// sealed cookie; this OR-fold vectorises.)
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Memo {
    /// The slot of a sealed value, from its last 8 bytes (the AEAD tag's: random to anyone
    /// without the key, and only values that opened are kept) mixed with this thread's key. A
    /// multiply, where hashing the whole value cost ~0.4k instructions; the full comparison
    /// decides.
    fn slot_of(&self, sealed: &[u8]) -> usize {
        let mut tail = [0u8; 8];
        let n = sealed.len().min(tail.len());
        tail[..n].copy_from_slice(&sealed[sealed.len() - n..]);
        let mixed = (u64::from_le_bytes(tail) ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((mixed >> 32) as usize) % SLOTS
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn session(sub: &str) -> Session {
        Session {
            sub: sub.into(),
            email: Some(format!("{sub}@example.test")),
            name: None,
            picture: None,
            iat: NOW - 60,
            exp: NOW + 3600,
        }
    }

    /// A stand-in assertion that shows whose it is and for which second.
    fn sign_counting(signed: &Cell<u32>) -> impl Fn(&Session, u64) -> HeaderValue + '_ {
        move |s, now| {
            signed.set(signed.get() + 1);
            HeaderValue::from_str(&format!("{}@{now}", s.sub)).unwrap()
        }
    }

    #[test]
    fn a_cookie_seen_before_is_not_opened_again_and_its_assertion_is_signed_once_a_second() {
        let cache = SessionCache::new();
        let (opened, signed) = (Cell::new(0), Cell::new(0));
        let open = || {
            opened.set(opened.get() + 1);
            Ok(session("alice"))
        };
        let first = cache
            .verify(b"sealed-alice", NOW, open, sign_counting(&signed))
            .unwrap();
        let again = cache
            .verify(b"sealed-alice", NOW, open, sign_counting(&signed))
            .unwrap();
        assert_eq!((opened.get(), signed.get()), (1, 1));
        assert_eq!(*again.session, *first.session);
        assert_eq!(again.assertion, "alice@1800000000");

        let next_second = cache
            .verify(b"sealed-alice", NOW + 1, open, sign_counting(&signed))
            .unwrap();
        assert_eq!((opened.get(), signed.get()), (1, 2));
        assert_eq!(next_second.assertion, "alice@1800000001");
    }

    #[test]
    fn a_recalled_session_still_expires_on_time() {
        let cache = SessionCache::new();
        let signed = Cell::new(0);
        let opened = Cell::new(0);
        let open = || {
            opened.set(opened.get() + 1);
            Ok(session("bob"))
        };
        assert!(cache
            .verify(b"sealed-bob", NOW, open, sign_counting(&signed))
            .is_ok());
        let exp = session("bob").exp;
        assert!(cache
            .verify(b"sealed-bob", exp - 1, open, sign_counting(&signed))
            .is_ok());
        assert_eq!(
            cache
                .verify(b"sealed-bob", exp, open, sign_counting(&signed))
                .unwrap_err(),
            SessionError::Expired
        );
        assert_eq!(opened.get(), 1, "expiry came from the memo");
    }

    #[test]
    fn another_generation_opens_the_cookie_itself() {
        let (old, new) = (SessionCache::new(), SessionCache::new());
        let signed = Cell::new(0);
        let opened = Cell::new(0);
        let open_ok = || {
            opened.set(opened.get() + 1);
            Ok(session("carol"))
        };
        assert!(old
            .verify(b"sealed-carol", NOW, open_ok, sign_counting(&signed))
            .is_ok());
        // Under the new generation's keys the same bytes no longer open.
        let refused = new.verify(
            b"sealed-carol",
            NOW,
            || Err(SessionError::Invalid),
            sign_counting(&signed),
        );
        assert_eq!(refused.unwrap_err(), SessionError::Invalid);
        assert_eq!(opened.get(), 1);
    }

    #[test]
    fn failed_checks_are_not_remembered() {
        let cache = SessionCache::new();
        let signed = Cell::new(0);
        let tries = Cell::new(0);
        for _ in 0..3 {
            let refused = cache.verify(
                b"tampered",
                NOW,
                || {
                    tries.set(tries.get() + 1);
                    Err(SessionError::Invalid)
                },
                sign_counting(&signed),
            );
            assert_eq!(refused.unwrap_err(), SessionError::Invalid);
        }
        assert_eq!((tries.get(), signed.get()), (3, 0));
    }

    #[test]
    fn cookies_match_only_byte_for_byte() {
        let sealed: &[u8] = b"v1.AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_";
        let copy = sealed.to_vec();
        assert!(same_bytes(sealed, &copy));
        let mut last_differs = sealed.to_vec();
        *last_differs.last_mut().unwrap() = b'A';
        assert!(!same_bytes(sealed, &last_differs));
        assert!(!same_bytes(sealed, &sealed[..sealed.len() - 1]));
        assert!(!same_bytes(sealed, &[sealed, b"_"].concat()));
        assert!(!same_bytes(sealed, b""));
    }

    #[test]
    fn colliding_cookies_each_get_their_own_session() {
        let cache = SessionCache::new();
        let signed = Cell::new(0);
        // Four times the slots: many collide, and every answer must still be the cookie's own.
        for round in 0..2 {
            for i in 0..SLOTS * 4 {
                let sub = format!("user{i}");
                let verified = cache
                    .verify(
                        format!("sealed-{i}").as_bytes(),
                        NOW,
                        || Ok(session(&sub)),
                        sign_counting(&signed),
                    )
                    .unwrap();
                assert_eq!(verified.session.sub, sub, "round {round}");
                assert_eq!(verified.assertion, format!("{sub}@{NOW}").as_str());
            }
        }
    }
}
