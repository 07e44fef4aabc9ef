//! Path normalisation and route policies: no panic, clean normalised paths, and the policy
//! applied is never weaker than the normalised path's own.
#![no_main]

use std::sync::OnceLock;

use custodia_proxy::auth::{normalise_path, Policy, RouteTable};
use libfuzzer_sys::fuzz_target;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let routes = [
            ("/", Policy::Optional),
            ("/healthz", Policy::Public),
            ("/api/hello", Policy::Public),
            ("/api/", Policy::Required),
            ("/public/", Policy::Public),
            ("/admin", Policy::Required),
            ("/café/", Policy::Public),
        ];
        RouteTable::new(
            routes
                .iter()
                .map(|(p, policy)| (p.to_string(), *policy))
                .collect(),
            Policy::Required,
        )
        .expect("valid routes")
    })
}

fuzz_target!(|raw: &str| {
    let table = table();
    let normalised = normalise_path(raw);
    let applied = table.policy_for_request(raw);
    assert_eq!(normalised.is_ok(), applied.is_ok(), "{raw:?}");
    let (Ok(normalised), Ok(applied)) = (normalised, applied) else {
        return;
    };
    assert!(normalised.starts_with('/'), "{raw:?} → {normalised:?}");
    assert!(!normalised.contains("//"), "{raw:?} → {normalised:?}");
    assert!(
        !normalised.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} → {normalised:?}"
    );
    let own = table.policy_for(&normalised);
    assert!(
        applied >= own,
        "{raw:?}: {applied} < {own} of {normalised:?}"
    );
    let escaped = normalised.replace('%', "%25").replace('?', "%3F");
    assert_eq!(normalise_path(&escaped).as_deref(), Ok(normalised.as_str()));
    assert_eq!(table.policy_for_request(&escaped), Ok(own), "{escaped:?}");
});
