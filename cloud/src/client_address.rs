//! Who the client is, behind reverse proxies: the address the per-address rate limit keys on.
//!
//! Behind a TLS-terminating proxy every request arrives from the proxy's address, so a limit
//! keyed on the TCP peer would put the whole fleet in one bucket. Forwarding headers fix that,
//! but anyone can send them: a client could pick its own bucket (or someone else's). So they
//! are believed only from peers the operator declared with `--trusted-proxies`, and only as far
//! as the chain of trusted hops goes: walking the chain from the right (the hop nearest to us),
//! every trusted proxy is skipped and the first untrusted address is the client. Entries left of
//! it were written by the client itself and are never read.
//!
//! `Forwarded` (RFC 7239) is read when present, `X-Forwarded-For` otherwise; a hop that does not
//! parse as an address ends the walk at the last trusted hop's view (the peer it came from is
//! unknown, so the request is keyed on that proxy, which errs on the side of limiting).

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// The proxies whose forwarding headers are believed (`--trusted-proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

/// A `--trusted-proxies` entry that is not an address or CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trusted proxy {0:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 127.0.0.1)")]
pub struct BadProxyNet(pub String);

impl FromStr for TrustedProxies {
    type Err = BadProxyNet;

    /// Comma-separated addresses or CIDRs; empty means none.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => part
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| BadProxyNet(part.to_string()))?,
            };
            nets.push(net);
        }
        Ok(TrustedProxies { nets })
    }
}

impl TrustedProxies {
    /// Whether any proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack socket reports) compare as
/// the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// One hop of a forwarding header: an address, or something else (`unknown`, an obfuscated
/// identifier, garbage).
fn parse_hop(raw: &str) -> Option<IpAddr> {
    let s = raw.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // "[2001:db8::1]:4711" or "[2001:db8::1]"
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    // "192.0.2.1:4711"
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4)
}

/// The `for=` hops of `Forwarded` header values, in order (leftmost = farthest).
fn forwarded_hops(values: &[&str]) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for value in values {
        for element in value.split(',') {
            let for_value = element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then_some(v)
            });
            if let Some(v) = for_value {
                hops.push(parse_hop(v));
            }
        }
    }
    hops
}

/// The hops of `X-Forwarded-For` header values, in order.
fn x_forwarded_hops(values: &[&str]) -> Vec<Option<IpAddr>> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(parse_hop)
        .collect()
}

/// The client's address: `peer` unless `peer` is a trusted proxy, then the rightmost untrusted
/// hop of the forwarding chain (see the module docs). A pure function of its inputs.
pub fn client_address(
    peer: IpAddr,
    forwarded: &[&str],
    x_forwarded_for: &[&str],
    trusted: &TrustedProxies,
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    let hops = if forwarded.is_empty() {
        x_forwarded_hops(x_forwarded_for)
    } else {
        forwarded_hops(forwarded)
    };
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        match hop.map(canonical) {
            Some(ip) if trusted.contains(ip) => client = ip,
            Some(ip) => return ip,
            // The trusted proxy could not say who called it: key on that proxy.
            None => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn trusted(s: &str) -> TrustedProxies {
        s.parse().expect("trusted")
    }

    #[test]
    fn untrusted_peers_are_taken_at_their_word_and_their_headers_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(
            client_address(ip("203.0.113.9"), &[], &["198.51.100.1"], &none),
            ip("203.0.113.9")
        );
        let t = trusted("10.0.0.0/8");
        assert_eq!(
            client_address(
                ip("203.0.113.9"),
                &["for=198.51.100.1"],
                &["198.51.100.1"],
                &t
            ),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let t = trusted("10.0.0.0/8, 127.0.0.1");
        // client forged a leftmost entry; the real client is the one our proxy appended
        assert_eq!(
            client_address(
                ip("127.0.0.1"),
                &[],
                &["6.6.6.6, 198.51.100.7", "10.1.2.3"],
                &t
            ),
            ip("198.51.100.7")
        );
        // RFC 7239 wins over X-Forwarded-For; quoted IPv6 with port
        assert_eq!(
            client_address(
                ip("10.0.0.5"),
                &["for=192.0.2.60;proto=https, for=\"[2001:db8:cafe::17]:4711\""],
                &["1.1.1.1"],
                &t
            ),
            ip("2001:db8:cafe::17")
        );
        // an unknown hop: keyed on the proxy that could not tell
        assert_eq!(
            client_address(ip("10.0.0.5"), &["for=unknown"], &[], &t),
            ip("10.0.0.5")
        );
        // no header at all from a trusted proxy: the proxy itself
        assert_eq!(client_address(ip("10.0.0.5"), &[], &[], &t), ip("10.0.0.5"));
        // IPv4-mapped peer matches an IPv4 CIDR
        assert_eq!(
            client_address(ip("::ffff:127.0.0.1"), &[], &["192.0.2.1:8080"], &t),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("example.com".parse::<TrustedProxies>().is_err());
        assert!("".parse::<TrustedProxies>().expect("empty").is_empty());
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    proptest! {
        /// Whatever a client writes into the headers, it cannot choose its bucket: the answer
        /// is the untrusted peer, or an address a trusted proxy appended.
        #[test]
        fn a_client_cannot_pick_its_own_bucket(
            peer in arb_ip(), forged in proptest::collection::vec(arb_ip(), 0..5), junk in ".{0,40}"
        ) {
            let t = trusted("10.0.0.0/8");
            let list: Vec<String> = forged.iter().map(ToString::to_string).collect();
            let xff = format!("{}, {junk}", list.join(", "));
            let fwd = format!("for={junk}");
            // straight from the client
            let got = client_address(peer, &[&fwd], &[&xff], &t);
            if !t.contains(peer) {
                prop_assert_eq!(got, canonical(peer));
            }
            // through one trusted proxy that appended the real client
            let real = ip("198.51.100.77");
            let through = format!("{xff}, {real}");
            prop_assert_eq!(client_address(ip("10.9.9.9"), &[], &[&through], &t), real);
        }

        #[test]
        fn any_header_text_is_handled(peer in arb_ip(), fwd in ".{0,80}", xff in ".{0,80}") {
            let t = trusted("0.0.0.0/0, ::/0");
            let _ = client_address(peer, &[&fwd], &[&xff], &t);
        }
    }
}
