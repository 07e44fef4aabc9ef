//! `rd` return targets: whatever is accepted stays on our origin under every decoding.
#![no_main]

use custodia_proxy::auth::redirect::DECODE_ROUNDS;
use custodia_proxy::auth::safe_return_target;
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode;
use url::Url;

fuzz_target!(|rd: &str| {
    let Some(target) = safe_return_target(rd) else {
        return;
    };
    assert!(target.is_ascii(), "{rd:?} → {target:?}");
    let base = Url::parse("https://app.example:8443/some/page").expect("base URL");
    let mut form = target.clone();
    for round in 0..=DECODE_ROUNDS + 1 {
        let bytes = form.as_bytes();
        assert_eq!(bytes.first(), Some(&b'/'), "{rd:?} round {round}: {form:?}");
        assert!(
            !matches!(bytes.get(1), Some(b'/' | b'\\')),
            "{rd:?} round {round}: {form:?}"
        );
        assert!(!form.contains('\\'), "{rd:?} round {round}: {form:?}");
        assert!(
            !form.chars().any(char::is_control),
            "{rd:?} round {round}: {form:?}"
        );
        let resolved = base.join(&form).expect("a path resolves");
        assert_eq!(
            resolved.origin(),
            base.origin(),
            "{rd:?} round {round}: {form:?} → {resolved}"
        );
        form = percent_decode(form.as_bytes())
            .decode_utf8_lossy()
            .into_owned();
    }
});
