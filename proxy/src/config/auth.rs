//! Validation of `[auth]` and `[[route]]`, completed from the environment. With `[auth]`
//! present, a missing issuer, client id or secret is an error — never "auth off".
//!
//! Rules:
//! 1. issuer: `[auth] issuer`, else `CUSTODIA_AUTH_ISSUER`, else `https://$AUTH0_DOMAIN/`; an
//!    http(s) URL, plain http only for a loopback host.
//! 2. client_id: `[auth] client_id`, else `AUTH0_CLIENT_ID`; client secret: `AUTH0_CLIENT_SECRET`.
//! 3. `APP_SECRET_KEY` at least 32 bytes; `APP_SECRET_KEY_PREVIOUS` (comma-separated) likewise.
//! 4. `CUSTODIA_ASSERTION_KEY` at least 32 bytes, else derived from `APP_SECRET_KEY`.
//! 5. public_url: an http(s) origin (no path, query or fragment).
//! 6. scopes include `openid`; session_ttl between 1 s and 30 days.
//! 7. trusted_proxies: CIDRs or bare IPs; allowed_domains / allowed_emails well-formed.
//! 8. routes: prefixes start with `/`, are already normalised, appear once; they need `[auth]`.

use std::time::Duration;

use super::env::{Env, Secret};
use super::file::{AuthSection, ClientAuthName, PolicyName, RouteEntry};
use super::model::{AuthSettings, ClientAuth, RoutePolicy};

/// An auth rule broken: (key, message); the caller adds file and line.
pub type AuthProblem = (&'static str, String);

const KEY_HINT: &str = "generate one with: openssl rand -hex 32";

pub fn policy(name: PolicyName) -> RoutePolicy {
    match name {
        PolicyName::Public => RoutePolicy::Public,
        PolicyName::Optional => RoutePolicy::Optional,
        PolicyName::Required => RoutePolicy::Required,
    }
}

pub fn validate_auth(
    section: AuthSection,
    routes: Vec<RouteEntry>,
    env: &dyn Env,
) -> Result<AuthSettings, AuthProblem> {
    // A value from the environment is named in its error: it is not on any line of the file.
    let from_env = |name: &str, message: String| format!("{name} (environment or .env): {message}");
    let issuer = match (
        section.issuer,
        env.get("CUSTODIA_AUTH_ISSUER"),
        env.get("AUTH0_DOMAIN"),
    ) {
        (Some(issuer), _, _) => {
            check_issuer(&issuer).map_err(|m| ("auth.issuer", m))?;
            issuer
        }
        (None, Some(issuer), _) => {
            check_issuer(&issuer)
                .map_err(|m| ("auth.issuer", from_env("CUSTODIA_AUTH_ISSUER", m)))?;
            issuer
        }
        (None, None, Some(domain)) => {
            issuer_of_domain(&domain).map_err(|m| ("auth.issuer", from_env("AUTH0_DOMAIN", m)))?
        }
        (None, None, None) => return Err((
            "auth.issuer",
            "no identity provider: set [auth] issuer, or AUTH0_DOMAIN in the environment or .env \
                 (remove [auth] to run as a plain load balancer)"
                .into(),
        )),
    };

    let client_id = match section.client_id {
        Some(id) => {
            check_credential("client_id", &id).map_err(|m| ("auth.client_id", m))?;
            id
        }
        None => {
            let id = env.get("AUTH0_CLIENT_ID").ok_or((
                "auth.client_id",
                "no client id: set [auth] client_id or AUTH0_CLIENT_ID".to_string(),
            ))?;
            check_credential("AUTH0_CLIENT_ID", &id).map_err(|m| ("auth.client_id", m))?;
            id
        }
    };
    let client_secret = env.get("AUTH0_CLIENT_SECRET").ok_or((
        "auth",
        "AUTH0_CLIENT_SECRET is not set (the client secret comes from the environment or .env, never the file)"
            .to_string(),
    ))?;
    check_credential("AUTH0_CLIENT_SECRET", &client_secret).map_err(|m| ("auth", m))?;

    let session_secret = env.get("APP_SECRET_KEY").ok_or((
        "auth",
        format!("APP_SECRET_KEY is not set: it seals the session cookies; {KEY_HINT}"),
    ))?;
    check_secret("APP_SECRET_KEY", &session_secret)?;
    let mut previous_session_secrets = Vec::new();
    if let Some(list) = env.get("APP_SECRET_KEY_PREVIOUS") {
        for old in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            check_secret("APP_SECRET_KEY_PREVIOUS", old)?;
            previous_session_secrets.push(Secret(old.to_string()));
        }
    }
    let assertion_key = match env.get("CUSTODIA_ASSERTION_KEY") {
        Some(key) => {
            check_secret("CUSTODIA_ASSERTION_KEY", &key)?;
            if key == session_secret || previous_session_secrets.iter().any(|old| old.0 == key) {
                return Err((
                    "auth",
                    "CUSTODIA_ASSERTION_KEY is also a session key (APP_SECRET_KEY or one of \
                     APP_SECRET_KEY_PREVIOUS): every worker holds the assertion key, and with \
                     this one could seal sessions; leave it unset (it is then derived from \
                     APP_SECRET_KEY) or give it its own value"
                        .to_string(),
                ));
            }
            key
        }
        None => custodia_identity::derive_assertion_key(&session_secret),
    };

    let public_url =
        check_public_url(section.public_url.get_ref()).map_err(|m| ("auth.public_url", m))?;
    let secure_cookies = public_url.starts_with("https://");

    if !section.scopes.iter().any(|s| s == "openid") {
        return Err(("auth.scopes", "must include \"openid\"".into()));
    }
    let ttl = section.session_ttl.0;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 24 * 3600) {
        return Err(("auth.session_ttl", "must be between 1s and 30 days".into()));
    }

    let mut trusted_proxies = Vec::new();
    for entry in section.trusted_proxies.get_ref() {
        let net = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                (
                    "auth.trusted_proxies",
                    format!("`{entry}` is not an IP address or CIDR such as \"127.0.0.1/32\""),
                )
            })?;
        trusted_proxies.push(net);
    }

    // Entries are compared with a signed-in user's email exactly (ASCII case aside): one that
    // no address can equal would lock out whoever it was meant for, silently.
    let mut allowed_emails = Vec::new();
    for email in &section.allowed_emails {
        let email = email.trim().to_ascii_lowercase();
        match email.split_once('@') {
            Some((local, domain)) if !local.is_empty() && is_mail_domain(domain) => {
                allowed_emails.push(email)
            }
            _ => {
                return Err((
                    "auth.allowed_emails",
                    format!("`{email}` is not an email address"),
                ))
            }
        }
    }
    let mut allowed_domains = Vec::new();
    for domain in &section.allowed_domains {
        let domain = domain.trim().trim_start_matches('@').to_ascii_lowercase();
        if domain.contains('*') {
            return Err((
                "auth.allowed_domains",
                format!(
                    "`{domain}`: wildcards are not supported; a domain admits the emails of \
                     exactly that domain (list each subdomain on its own)"
                ),
            ));
        }
        if !is_mail_domain(&domain) {
            return Err((
                "auth.allowed_domains",
                format!("`{domain}` is not a domain name such as \"example.com\""),
            ));
        }
        allowed_domains.push(domain);
    }

    let routes = check_routes(routes)?;

    Ok(AuthSettings {
        issuer,
        client_id,
        client_secret: Secret(client_secret),
        client_auth: section.client_auth.map(|c| match c {
            ClientAuthName::ClientSecretBasic => ClientAuth::Basic,
            ClientAuthName::ClientSecretPost => ClientAuth::Post,
        }),
        public_url,
        secure_cookies,
        scopes: section.scopes,
        session_ttl: ttl,
        allowed_emails,
        allowed_domains,
        trusted_proxies,
        default_policy: policy(section.default_policy),
        routes,
        session_secret: Secret(session_secret),
        previous_session_secrets,
        assertion_key: Secret(assertion_key),
    })
}

fn check_secret(name: &'static str, value: &str) -> Result<(), AuthProblem> {
    // A copied `.env.example` must not start a proxy whose sessions anyone can forge.
    match custodia_identity::secret_weakness(value.as_bytes()) {
        Some(weakness) => Err(("auth", format!("{name} is {weakness}: {KEY_HINT}"))),
        None => Ok(()),
    }
}

/// A client id or secret as the IdP gave it: not blank, not padded with spaces (a copy's
/// slip the IdP would refuse at the first login), not `.env.example`'s placeholder. Values are
/// never quoted: the secret's must not reach a log.
fn check_credential(name: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{name} is blank"));
    }
    if value.trim() != value {
        return Err(format!(
            "{name} starts or ends with spaces: set it to the value exactly as the identity \
             provider shows it"
        ));
    }
    if value.to_ascii_lowercase().starts_with("your-") {
        return Err(format!(
            "{name} is still .env.example's placeholder: set it to your application's value \
             in the identity provider (Auth0: Applications → Settings)"
        ));
    }
    Ok(())
}

/// `https://DOMAIN/` from `AUTH0_DOMAIN` (`tenant.eu.auth0.com`, also with `https://` or a
/// trailing `/`): a host and maybe a port, nothing else.
fn issuer_of_domain(domain: &str) -> Result<String, String> {
    let domain = domain.trim().trim_end_matches('/');
    let domain = domain.strip_prefix("https://").unwrap_or(domain);
    let issuer = format!("https://{domain}/");
    match url_parts(&issuer) {
        Some(url) if url.rest == "/" => {}
        _ => {
            return Err(format!(
                "`{domain}` is not a domain name such as \"tenant.eu.auth0.com\" (no path, \
                 query or user)"
            ))
        }
    }
    if domain.to_ascii_lowercase().starts_with("your-tenant.") {
        return Err(format!(
            "`{domain}` is still .env.example's placeholder: set it to your Auth0 tenant's domain"
        ));
    }
    Ok(issuer)
}

fn check_issuer(issuer: &str) -> Result<(), String> {
    let url = url_parts(issuer)
        .ok_or_else(|| format!("`{issuer}` is not a URL such as \"https://TENANT.auth0.com/\""))?;
    if url.scheme == "http" && !is_loopback_host(&url.host) {
        return Err(format!(
            "`{issuer}` uses plain http: only https is allowed for an identity provider that is not on loopback"
        ));
    }
    // OpenID Connect Discovery: an issuer identifier has no query or fragment, and the ID
    // tokens' `iss` must equal it exactly.
    if url.rest.contains(['?', '#']) {
        return Err(format!(
            "`{issuer}` has a query or fragment: an issuer is a URL without either"
        ));
    }
    Ok(())
}

fn check_public_url(text: &str) -> Result<String, String> {
    let url = url_parts(text).ok_or_else(|| {
        format!("`{text}` is not a URL such as \"https://example.ngrok-free.app\"")
    })?;
    if !(url.rest.is_empty() || url.rest == "/") {
        return Err(format!(
            "`{text}` must be an origin only (scheme, host and port), without a path, query or fragment"
        ));
    }
    // The shipped container config's placeholder: left in, the stack would come up healthy
    // and every login would end at the IdP's "callback URL mismatch".
    if url.host.to_ascii_lowercase().starts_with("your-domain.") {
        return Err(format!(
            "`{text}` is still the example's placeholder: set it to the address users open, \
             https:// + your NGROK_DOMAIN (the IdP must allow it + \"/callback\")"
        ));
    }
    Ok(format!("{}://{}", url.scheme, url.authority))
}

struct UrlParts {
    scheme: String,
    authority: String,
    host: String,
    rest: String,
}

/// Just enough URL parsing to validate http(s) URLs from the config.
fn url_parts(text: &str) -> Option<UrlParts> {
    let (scheme, after) = text.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    if authority.is_empty()
        || authority.contains('@')
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    // A port is 1–65535 in digits: anything else makes a redirect_uri no browser can follow.
    let valid_port = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|p| p > 0)
    };
    let bracketed = authority.starts_with('[');
    let valid_host = if bracketed {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        is_host_name(host)
    };
    if !valid_host
        || !port.is_none_or(valid_port)
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    let host = host.to_string();
    Some(UrlParts {
        scheme,
        authority: authority.to_ascii_lowercase(),
        host: host.to_ascii_lowercase(),
        rest: rest.to_string(),
    })
}

/// An IPv4 address or a DNS name: dot-separated labels of letters, digits and inner hyphens
/// (a browser cannot follow a redirect to `a:b`, `...` or `-`).
fn is_host_name(host: &str) -> bool {
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The domain of an email address: a DNS name with at least two labels.
fn is_mail_domain(domain: &str) -> bool {
    is_host_name(domain)
        && domain.parse::<std::net::Ipv4Addr>().is_err()
        && domain.contains('.')
        && !domain.ends_with('.')
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn check_routes(routes: Vec<RouteEntry>) -> Result<Vec<(String, RoutePolicy)>, AuthProblem> {
    if let Some((_, problem)) = first_bad_route(&routes) {
        return Err(problem);
    }
    Ok(routes
        .into_iter()
        .map(|route| (route.prefix, policy(route.policy)))
        .collect())
}

/// The first `[[route]]` whose prefix is not a normalised absolute path or repeats an earlier
/// one: its index (for the line the error names) and the problem.
pub fn first_bad_route(routes: &[RouteEntry]) -> Option<(usize, AuthProblem)> {
    for (index, route) in routes.iter().enumerate() {
        let normalised = crate::auth::normalise_path(&route.prefix).ok();
        if !route.prefix.starts_with('/') || normalised.as_deref() != Some(route.prefix.as_str()) {
            return Some((
                index,
                (
                    "route.prefix",
                    format!(
                        "`{}` must be a normalised absolute path such as \"/api/\" (no `..`, `//`, `%` escapes or `?`)",
                        route.prefix
                    ),
                ),
            ));
        }
        // Matching ignores ASCII case, so prefixes differing only in case collide.
        if routes[..index]
            .iter()
            .any(|earlier| earlier.prefix.eq_ignore_ascii_case(&route.prefix))
        {
            return Some((
                index,
                (
                    "route.prefix",
                    format!("`{}` is listed twice", route.prefix),
                ),
            ));
        }
    }
    None
}
