//! SPIFFE identities carried as SAN URIs: `spiffe://<trust-domain>/<role>/<name>`.
//!
//! Tether uses three roles an agent cares about: `appliance` (its own certificate),
//! `broker` (the servers it connects to) and, later, `control`. Parsing is strict: a
//! trust domain of lowercase letters, digits, `.`, `-` and `_`; exactly two path segments of
//! letters, digits, `.`, `-` and `_`, neither `.` nor `..`. Anything else is not an identity.

/// A parsed Tether SPIFFE identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId<'a> {
    /// The trust domain (authority part of the URI).
    pub trust_domain: &'a str,
    /// The first path segment: `appliance`, `broker`, ...
    pub role: &'a str,
    /// The second path segment: the appliance id or broker name.
    pub name: &'a str,
}

/// Longest URI accepted, in bytes (SPIFFE caps ids at 2048).
const MAX_URI_LEN: usize = 2048;
/// Longest trust domain, in bytes (SPIFFE caps it at 255).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

impl<'a> SpiffeId<'a> {
    /// Parse `spiffe://<td>/<role>/<name>`; `None` if the URI is not of that exact shape.
    pub fn parse(uri: &'a str) -> Option<SpiffeId<'a>> {
        if uri.len() > MAX_URI_LEN {
            return None;
        }
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        if trust_domain.is_empty()
            || trust_domain.len() > MAX_TRUST_DOMAIN_LEN
            || !trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return None;
        }
        let (role, name) = path.split_once('/')?;
        if !valid_segment(role) || !valid_segment(name) {
            return None;
        }
        Some(SpiffeId {
            trust_domain,
            role,
            name,
        })
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// Role of an appliance certificate.
pub const ROLE_APPLIANCE: &str = "appliance";
/// Role of a broker certificate.
pub const ROLE_BROKER: &str = "broker";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_appliance_and_broker_ids() {
        assert_eq!(
            SpiffeId::parse("spiffe://acme.example/appliance/app-1"),
            Some(SpiffeId {
                trust_domain: "acme.example",
                role: "appliance",
                name: "app-1"
            })
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/broker/b1").map(|s| s.role),
            Some("broker")
        );
    }

    #[test]
    fn refuses_malformed_ids() {
        for uri in [
            "https://td/broker/b1",
            "spiffe://td/broker",
            "spiffe://td/broker/b1/extra",
            "spiffe://TD/broker/b1",
            "spiffe:///broker/b1",
            "spiffe://td/broker/..",
            "spiffe://td/broker/",
            "spiffe://td//b1",
            "spiffe://td/broker/b 1",
            "spiffe://td:443/broker/b1",
        ] {
            assert_eq!(SpiffeId::parse(uri), None, "{uri}");
        }
    }
}
