//! Sealed-cookie decoding: any bytes as a sealed value, a session or login-state cookie, or a
//! whole `Cookie` header. Nothing may panic, and nothing but a value we sealed may open.
#![no_main]

use std::sync::OnceLock;

use custodia_proxy::auth::{
    open_login_state, open_session, read_cookie, seal, unseal, CookieSettings, Purpose, SecretKeys,
};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static SecretKeys {
    static KEYS: OnceLock<SecretKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        SecretKeys::from_secrets(
            "fuzz-current-secret-fuzz-current-01",
            &["fuzz-previous-secret-fuzz-previous-1".to_string()],
        )
        .expect("valid secrets")
    })
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    // As a Cookie header: parsing, chunk reassembly and stripping.
    for secure in [false, true] {
        let settings = CookieSettings { secure };
        if let Some(value) = settings.read_session(std::iter::once(data)) {
            assert!(
                open_session(keys, &value, 0).is_err(),
                "forged session {value:?}"
            );
        }
        let _ = settings.read_login_cookie(std::iter::once(data), "state");
    }
    let _ = read_cookie(std::iter::once(data), "custodia_session");
    if let Some(kept) = custodia_proxy::auth::cookies::strip_custodia_cookie_bytes(data) {
        assert!(CookieSettings { secure: false }
            .read_session(std::iter::once(kept.as_slice()))
            .is_none());
    }
    // As a sealed value: never opens (a forgery), never panics.
    if let Ok(text) = std::str::from_utf8(data) {
        for purpose in [Purpose::Session, Purpose::LoginState] {
            assert!(unseal(keys, purpose, text).is_err(), "forged {text:?}");
        }
        assert!(open_login_state(keys, text, "state", 0).is_err());
    }
    // And as a plaintext: sealing round-trips.
    let sealed = seal(keys, Purpose::Session, data);
    assert_eq!(unseal(keys, Purpose::Session, &sealed).as_deref(), Ok(data));
});
