//! Settings that are valid but weaken the proxy: allowed (a lab, a test rig, a network the
//! operator controls), and said at every start and in `--check`, so no one runs them unaware.

use super::model::ProxyConfig;

/// One sentence per risky setting, naming its key.
pub fn risky_settings(config: &ProxyConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let Some(auth) = &config.auth else {
        return warnings;
    };
    if !auth.secure_cookies && !public_url_is_loopback(&auth.public_url) {
        warnings.push(format!(
            "auth.public_url {} is plain http off loopback: session cookies go over the network \
             unencrypted and without Secure, where anyone on the path can take a session; \
             serve users https (the ngrok tunnel does)",
            auth.public_url
        ));
    }
    for everyone in auth
        .trusted_proxies
        .iter()
        .filter(|net| net.prefix_len() == 0)
    {
        warnings.push(format!(
            "auth.trusted_proxies has {everyone}, every address: any client can set \
             X-Forwarded-For, -Proto and -Host, choose the address its login rate limit counts \
             and claim https; list only the proxies in front of this one (the ngrok agent's)"
        ));
    }
    warnings
}

fn public_url_is_loopback(public_url: &str) -> bool {
    let host = public_url
        .split_once("://")
        .map_or(public_url, |(_, rest)| rest);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.rsplit_once(':').map_or(host, |(host, _port)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn warnings_of(auth: &str) -> Vec<String> {
        let env = super::super::tests::stack_env();
        let text = format!("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\n{auth}");
        risky_settings(&super::super::parse_with_env(&text, Path::new("w.toml"), &env).unwrap())
    }

    #[test]
    fn plain_http_off_loopback_and_trusting_everyone_are_said() {
        let http = warnings_of("public_url = \"http://app.example.com\"\n");
        assert_eq!(http.len(), 1, "{http:?}");
        assert!(http[0].contains("auth.public_url http://app.example.com is plain http"));
        let everyone = warnings_of(
            "public_url = \"https://app.example.com\"\n\
             trusted_proxies = [\"127.0.0.1\", \"0.0.0.0/0\", \"::/0\"]\n",
        );
        assert_eq!(everyone.len(), 2, "{everyone:?}");
        assert!(everyone[0].contains("0.0.0.0/0, every address"));
        assert!(everyone[1].contains("::/0, every address"));
        for quiet in [
            "public_url = \"http://127.0.0.1:8080\"\n",
            "public_url = \"http://localhost:8080\"\n",
            "public_url = \"http://[::1]:8080\"\n",
            "public_url = \"https://app.example.com\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
        ] {
            assert_eq!(warnings_of(quiet), Vec::<String>::new(), "{quiet}");
        }
    }
}
