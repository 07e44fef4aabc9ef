//! Which peers we believe about the original client: `X-Forwarded-For`, `-Proto` and `-Host`
//! count only when the TCP peer is one of `trusted_proxies` (the ngrok agent, say).
//!
//! Addresses are compared in canonical form, so an IPv4 peer seen on a dual-stack socket as
//! `::ffff:127.0.0.1` matches `127.0.0.1/32`, and returned in canonical form.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// A bad `trusted_proxies` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustedProxyError {
    #[error(
        "trusted_proxies entry {entry:?} is not an IP address or CIDR network \
         (like \"127.0.0.1\", \"127.0.0.1/32\" or \"10.0.0.0/8\")"
    )]
    Invalid { entry: String },
}

/// The networks whose forwarding headers we believe. Empty trusts nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parse CIDR networks (`"127.0.0.1/32"`, `"fd00::/8"`) or bare addresses (`"::1"`).
    pub fn parse<I, S>(entries: I) -> Result<TrustedProxies, TrustedProxyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        entries
            .into_iter()
            .map(|entry| {
                let text = entry.as_ref().trim();
                text.parse::<IpNet>()
                    .map(|net| net.trunc())
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| TrustedProxyError::Invalid {
                        entry: entry.as_ref().to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// From networks already parsed (by the config loader). Host bits are cleared.
    pub fn from_nets(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets.into_iter().map(|net| net.trunc()).collect())
    }

    /// Trust nobody.
    pub fn none() -> TrustedProxies {
        TrustedProxies(Vec::new())
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        // An IPv4-mapped IPv6 peer matches an IPv4 network as well as a mapped one.
        self.0
            .iter()
            .any(|net| net.contains(&ip) || (canonical != ip && net.contains(&canonical)))
    }

    /// The client's address. From an untrusted peer, the peer itself. From a trusted peer, walk
    /// `X-Forwarded-For` (pass every such header joined with `", "`) from the right, skipping
    /// trusted hops, and return the first untrusted address; if every entry is trusted, the
    /// leftmost. An entry that is not an address (`ip`, `ip:port`, `[v6]:port`) stops the walk:
    /// nothing to its left can be believed, so the last address reached is returned.
    pub fn client_ip(&self, peer: IpAddr, x_forwarded_for: Option<&str>) -> IpAddr {
        match self.vouch_for(peer) {
            Some(trusted) => trusted.client_ip(x_forwarded_for),
            None => peer.to_canonical(),
        }
    }

    /// `"http"` or `"https"` from `X-Forwarded-Proto`, only from a trusted peer and only when the
    /// header is exactly one of those (ASCII case-insensitive, surrounding spaces allowed).
    pub fn forwarded_proto(&self, peer: IpAddr, header: Option<&str>) -> Option<&'static str> {
        self.vouch_for(peer)?.forwarded_proto(header)
    }

    /// `X-Forwarded-Host`, only from a trusted peer and only if it is one `host[:port]` (a DNS
    /// name, an IPv4 address or a bracketed IPv6 address); returned lowercased.
    pub fn forwarded_host(&self, peer: IpAddr, header: Option<&str>) -> Option<String> {
        self.vouch_for(peer)?.forwarded_host(header)
    }

    /// `peer`, if it is a trusted proxy: what it says about the client can then be read with
    /// one membership check for all of it.
    pub fn vouch_for(&self, peer: IpAddr) -> Option<TrustedPeer<'_>> {
        self.contains(peer).then_some(TrustedPeer {
            proxies: self,
            peer,
        })
    }
}

/// A peer found in [`TrustedProxies`] ([`TrustedProxies::vouch_for`]).
#[derive(Debug, Clone, Copy)]
pub struct TrustedPeer<'a> {
    proxies: &'a TrustedProxies,
    peer: IpAddr,
}

impl TrustedPeer<'_> {
    /// See [`TrustedProxies::client_ip`].
    pub fn client_ip(&self, x_forwarded_for: Option<&str>) -> IpAddr {
        let mut client = self.peer.to_canonical();
        let Some(header) = x_forwarded_for else {
            return client;
        };
        for entry in header.rsplit(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_forwarded_ip(entry) else {
                return client;
            };
            client = ip.to_canonical();
            if !self.proxies.contains(ip) {
                return client;
            }
        }
        client
    }

    /// See [`TrustedProxies::forwarded_proto`].
    pub fn forwarded_proto(&self, header: Option<&str>) -> Option<&'static str> {
        let value = header?.trim();
        if value.eq_ignore_ascii_case("https") {
            Some("https")
        } else if value.eq_ignore_ascii_case("http") {
            Some("http")
        } else {
            None
        }
    }

    /// See [`TrustedProxies::forwarded_host`].
    pub fn forwarded_host(&self, header: Option<&str>) -> Option<String> {
        let value = header?.trim();
        is_host_and_port(value).then(|| value.to_ascii_lowercase())
    }
}

fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches('"');
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

fn is_host_and_port(value: &str) -> bool {
    if value.is_empty() || value.len() > 260 {
        return false;
    }
    let (host_ok, port) = if let Some(rest) = value.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<Ipv6Addr>().is_ok(), port),
            None => return false,
        }
    } else {
        // `port` keeps its ':' so both branches are checked alike below.
        let (host, port) = value.split_at(value.find(':').unwrap_or(value.len()));
        (is_hostname(host), port)
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            (1..=5).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && digits.parse::<u16>().is_ok_and(|p| p != 0)
        }
    };
    host_ok && port_ok
}

/// A DNS name (letters, digits, '-', dot-separated labels of 1–63, no leading or trailing '-')
/// or an IPv4 address, at most 253 characters.
fn is_hostname(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::parse(["127.0.0.1/32", "10.0.0.0/8", "::1"]).unwrap()
    }

    #[test]
    fn parses_networks_and_bare_addresses() {
        let t = TrustedProxies::parse([
            "127.0.0.1/32",
            " 10.1.2.3/8 ",
            "::1",
            "fd00::/8",
            "192.168.1.1",
        ])
        .unwrap();
        assert_eq!(
            t.networks()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "127.0.0.1/32",
                "10.0.0.0/8",
                "::1/128",
                "fd00::/8",
                "192.168.1.1/32"
            ]
        );
        assert!(t.contains(ip("10.200.0.1")));
        assert!(t.contains(ip("192.168.1.1")));
        assert!(!t.contains(ip("192.168.1.2")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!TrustedProxies::none().contains(ip("127.0.0.1")));
        assert!(TrustedProxies::parse(Vec::<String>::new())
            .unwrap()
            .networks()
            .is_empty());
    }

    #[test]
    fn a_bad_entry_is_named() {
        for bad in [
            "localhost",
            "127.0.0.1/33",
            "",
            "10.0.0.0/8/8",
            "1.2.3",
            "::1/129",
        ] {
            let err = TrustedProxies::parse(["127.0.0.1", bad]).unwrap_err();
            assert_eq!(err, TrustedProxyError::Invalid { entry: bad.into() });
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let t = trusted();
        assert!(t.contains(ip("::ffff:127.0.0.1")));
        assert!(t.contains(ip("::ffff:10.9.8.7")));
        assert!(!t.contains(ip("::ffff:8.8.8.8")));
        assert_eq!(
            t.client_ip(ip("::ffff:203.0.113.9"), None),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn the_client_ip_is_believed_only_through_trusted_hops() {
        let t = trusted();
        let agent = ip("127.0.0.1");
        let stranger = ip("198.51.100.20");
        let cases: &[(IpAddr, Option<&str>, &str)] = &[
            // Untrusted peer: its own address, whatever it claims.
            (stranger, Some("1.2.3.4"), "198.51.100.20"),
            (stranger, None, "198.51.100.20"),
            // Trusted peer: the rightmost untrusted entry.
            (agent, Some("203.0.113.7"), "203.0.113.7"),
            (agent, Some("6.6.6.6, 203.0.113.7"), "203.0.113.7"),
            (agent, Some("6.6.6.6, 203.0.113.7, 10.0.0.5"), "203.0.113.7"),
            (
                agent,
                Some("6.6.6.6,203.0.113.7 ,10.0.0.5,127.0.0.1"),
                "203.0.113.7",
            ),
            (agent, Some("203.0.113.7:5555"), "203.0.113.7"),
            (agent, Some("[2001:db8::1]:443"), "2001:db8::1"),
            (agent, Some("\"2001:db8::2\""), "2001:db8::2"),
            (agent, Some("2001:db8::3"), "2001:db8::3"),
            (agent, Some("::ffff:203.0.113.8"), "203.0.113.8"),
            // Every hop trusted: the leftmost.
            (agent, Some("10.0.0.9, 10.0.0.5"), "10.0.0.9"),
            // Nothing usable: the peer.
            (agent, None, "127.0.0.1"),
            (agent, Some(""), "127.0.0.1"),
            (agent, Some(" , ,"), "127.0.0.1"),
            // Junk stops the walk at the last address reached.
            (agent, Some("1.1.1.1, unknown"), "127.0.0.1"),
            (agent, Some("1.1.1.1, garbage, 10.0.0.5"), "10.0.0.5"),
            (
                agent,
                Some("1.1.1.1, 203.0.113.7, 10.0.0.5 extra"),
                "127.0.0.1",
            ),
        ];
        for (peer, header, expected) in cases {
            assert_eq!(
                t.client_ip(*peer, *header),
                ip(expected),
                "{peer} {header:?}"
            );
        }
    }

    #[test]
    fn forwarded_proto_needs_a_trusted_peer_and_an_exact_value() {
        let t = trusted();
        let agent = ip("127.0.0.1");
        assert_eq!(t.forwarded_proto(agent, Some("https")), Some("https"));
        assert_eq!(t.forwarded_proto(agent, Some("HTTPS")), Some("https"));
        assert_eq!(t.forwarded_proto(agent, Some(" http ")), Some("http"));
        for junk in [
            "",
            "ftp",
            "https, http",
            "https;",
            "https://",
            "ht tps",
            "wss",
        ] {
            assert_eq!(t.forwarded_proto(agent, Some(junk)), None, "{junk:?}");
        }
        assert_eq!(t.forwarded_proto(agent, None), None);
        assert_eq!(t.forwarded_proto(ip("203.0.113.1"), Some("https")), None);
    }

    #[test]
    fn forwarded_host_needs_a_trusted_peer_and_a_sane_value() {
        let t = trusted();
        let agent = ip("127.0.0.1");
        for (value, expected) in [
            ("example.ngrok-free.app", "example.ngrok-free.app"),
            ("Example.NGROK-free.app", "example.ngrok-free.app"),
            ("localhost:8080", "localhost:8080"),
            (" app.example.com:443 ", "app.example.com:443"),
            ("203.0.113.5", "203.0.113.5"),
            ("[::1]:8443", "[::1]:8443"),
            ("[2001:db8::1]", "[2001:db8::1]"),
            ("a", "a"),
        ] {
            assert_eq!(
                t.forwarded_host(agent, Some(value)).as_deref(),
                Some(expected),
                "{value:?}"
            );
        }
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = vec!["abcdefghi"; 26].join(".");
        for junk in [
            "",
            "evil.com, good.com",
            "evil.com/path",
            "evil.com@good.com",
            "user@evil.com",
            "evil.com:",
            "evil.com:0",
            "evil.com:65536",
            "evil.com:80:80",
            "evil.com:+80",
            "evil .com",
            "evil.com\r\nX-Injected: 1",
            "-evil.com",
            "evil-.com",
            "evil..com",
            ".evil.com",
            "evil.com.",
            "under_score.com",
            "::1",
            "[::1",
            "[not-v6]:80",
            "[::1]80",
            "éxample.com",
            "\"evil.com\"",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert_eq!(t.forwarded_host(agent, Some(junk)), None, "{junk:?}");
        }
        assert_eq!(t.forwarded_host(agent, None), None);
        assert_eq!(
            t.forwarded_host(ip("203.0.113.1"), Some("example.ngrok-free.app")),
            None,
            "never from an untrusted peer"
        );
    }
}
