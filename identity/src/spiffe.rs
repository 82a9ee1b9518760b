//! SPIFFE ids as Tether uses them, parsed and formatted in one place.
//!
//! | kind | URI |
//! |---|---|
//! | appliance | `spiffe://<td>/appliance/<id>` |
//! | broker | `spiffe://<td>/broker/<name>` |
//! | operator | `spiffe://<td>/operator/<name>` |
//! | control | `spiffe://<td>/control` |
//!
//! Parsing is exact: no port, user info, query, fragment, percent-encoding, empty or extra
//! segment; the trust domain and the name follow [`crate::name`]'s rules.

use std::fmt;

use thiserror::Error;

use crate::name::{
    check_name, check_trust_domain, ApplianceId, BrokerName, NameError, OperatorName, TrustDomain,
};

/// Longest URI accepted, bytes (SPIFFE's limit).
pub const MAX_URI_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// The kinds of identity in a Tether fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An appliance's agent (client certificates).
    Appliance,
    /// An edge broker (server and client certificates).
    Broker,
    /// A person or tool using control's API (client certificates).
    Operator,
    /// The control process (server certificate); has no name.
    Control,
}

impl Kind {
    /// The path segment (`appliance`, `broker`, `operator`, `control`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Appliance => "appliance",
            Kind::Broker => "broker",
            Kind::Operator => "operator",
            Kind::Control => "control",
        }
    }

    fn name_kind(self) -> &'static str {
        match self {
            Kind::Appliance => ApplianceId::KIND,
            Kind::Broker => BrokerName::KIND,
            Kind::Operator => OperatorName::KIND,
            Kind::Control => "control",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a URI is not a Tether SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpiffeError {
    /// Not a `spiffe://` URI.
    #[error("not a spiffe:// URI")]
    Scheme,
    /// Longer than [`MAX_URI_LEN`].
    #[error("SPIFFE id longer than {MAX_URI_LEN} bytes")]
    TooLong,
    /// The trust domain breaks its rule.
    #[error("invalid trust domain: {0}")]
    TrustDomain(NameError),
    /// The path is not `/<kind>/<name>` or `/control`.
    #[error("SPIFFE id path must be /<kind>/<name> or /control")]
    Path,
    /// The first path segment is no kind Tether knows.
    #[error("unknown identity kind {0:?}")]
    UnknownKind(String),
    /// The name breaks the name rule.
    #[error("{0}")]
    Name(NameError),
}

/// A parsed, validated SPIFFE id that borrows from the URI: what a handshake reads without
/// allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeRef<'a> {
    trust_domain: &'a str,
    kind: Kind,
    /// Empty for [`Kind::Control`].
    name: &'a str,
}

impl<'a> SpiffeRef<'a> {
    /// Parse `uri` (see the module documentation).
    pub fn parse(uri: &'a str) -> Result<SpiffeRef<'a>, SpiffeError> {
        if uri.len() > MAX_URI_LEN {
            return Err(SpiffeError::TooLong);
        }
        let rest = uri.strip_prefix(SCHEME).ok_or(SpiffeError::Scheme)?;
        let (trust_domain, path) = rest.split_once('/').ok_or(SpiffeError::Path)?;
        check_trust_domain(trust_domain).map_err(SpiffeError::TrustDomain)?;
        let (kind, name) = match path.split_once('/') {
            None if path == "control" => return Ok(SpiffeRef::control_in(trust_domain)),
            None => return Err(SpiffeError::Path),
            Some((kind, name)) => (kind, name),
        };
        let kind = match kind {
            "appliance" => Kind::Appliance,
            "broker" => Kind::Broker,
            "operator" => Kind::Operator,
            "" | "control" => return Err(SpiffeError::Path),
            other => return Err(SpiffeError::UnknownKind(other.chars().take(64).collect())),
        };
        check_name(kind.name_kind(), name).map_err(SpiffeError::Name)?;
        Ok(SpiffeRef {
            trust_domain,
            kind,
            name,
        })
    }

    fn control_in(trust_domain: &'a str) -> SpiffeRef<'a> {
        SpiffeRef {
            trust_domain,
            kind: Kind::Control,
            name: "",
        }
    }

    /// The trust domain (valid by construction).
    pub fn trust_domain(&self) -> &'a str {
        self.trust_domain
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The name; `None` for control.
    pub fn name(&self) -> Option<&'a str> {
        (self.kind != Kind::Control).then_some(self.name)
    }

    /// The appliance id, if this names an appliance.
    pub fn appliance(&self) -> Option<ApplianceId> {
        (self.kind == Kind::Appliance).then(|| ApplianceId::from_checked(self.name))
    }

    /// An owned copy.
    pub fn to_owned(&self) -> SpiffeId {
        let trust_domain = TrustDomain::from_checked(self.trust_domain);
        let subject = match self.kind {
            Kind::Appliance => Subject::Appliance(ApplianceId::from_checked(self.name)),
            Kind::Broker => Subject::Broker(BrokerName::from_checked(self.name)),
            Kind::Operator => Subject::Operator(OperatorName::from_checked(self.name)),
            Kind::Control => Subject::Control,
        };
        SpiffeId {
            trust_domain,
            subject,
        }
    }
}

/// Who a SPIFFE id names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// `.../appliance/<id>`
    Appliance(ApplianceId),
    /// `.../broker/<name>`
    Broker(BrokerName),
    /// `.../operator/<name>`
    Operator(OperatorName),
    /// `.../control`
    Control,
}

impl Subject {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Subject::Appliance(_) => Kind::Appliance,
            Subject::Broker(_) => Kind::Broker,
            Subject::Operator(_) => Kind::Operator,
            Subject::Control => Kind::Control,
        }
    }

    /// The name; `None` for control.
    pub fn name(&self) -> Option<&str> {
        match self {
            Subject::Appliance(n) => Some(n.as_str()),
            Subject::Broker(n) => Some(n.as_str()),
            Subject::Operator(n) => Some(n.as_str()),
            Subject::Control => None,
        }
    }
}

/// An owned SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Who it names.
    pub subject: Subject,
}

impl SpiffeId {
    /// Parse `uri` (see the module documentation).
    pub fn parse(uri: &str) -> Result<SpiffeId, SpiffeError> {
        SpiffeRef::parse(uri).map(|r| r.to_owned())
    }

    /// `spiffe://<td>/appliance/<id>`
    pub fn appliance(td: &TrustDomain, id: &ApplianceId) -> SpiffeId {
        SpiffeId::new(td, Subject::Appliance(id.clone()))
    }

    /// `spiffe://<td>/broker/<name>`
    pub fn broker(td: &TrustDomain, name: &BrokerName) -> SpiffeId {
        SpiffeId::new(td, Subject::Broker(name.clone()))
    }

    /// `spiffe://<td>/operator/<name>`
    pub fn operator(td: &TrustDomain, name: &OperatorName) -> SpiffeId {
        SpiffeId::new(td, Subject::Operator(name.clone()))
    }

    /// `spiffe://<td>/control`
    pub fn control(td: &TrustDomain) -> SpiffeId {
        SpiffeId::new(td, Subject::Control)
    }

    fn new(td: &TrustDomain, subject: Subject) -> SpiffeId {
        SpiffeId {
            trust_domain: td.clone(),
            subject,
        }
    }

    /// The URI.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.trust_domain, self.subject.kind())?;
        match self.subject.name() {
            Some(name) => write!(f, "/{name}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    #[test]
    fn round_trips_every_kind() {
        let t = td("acme.example");
        for id in [
            SpiffeId::appliance(&t, &ApplianceId::new("app-1").unwrap()),
            SpiffeId::broker(&t, &BrokerName::new("edge_1").unwrap()),
            SpiffeId::operator(&t, &OperatorName::new("Alice.B").unwrap()),
            SpiffeId::control(&t),
        ] {
            assert_eq!(SpiffeId::parse(&id.uri()).unwrap(), id);
        }
        assert_eq!(SpiffeId::control(&t).uri(), "spiffe://acme.example/control");
        let r = SpiffeRef::parse("spiffe://td/appliance/a.1").unwrap();
        assert_eq!(
            (r.trust_domain(), r.kind(), r.name()),
            ("td", Kind::Appliance, Some("a.1"))
        );
        assert_eq!(r.appliance().unwrap(), "a.1");
    }

    #[test]
    fn refuses_malformed_ids() {
        for (uri, err) in [
            ("https://td/broker/b1", SpiffeError::Scheme),
            ("spiffe://td/broker", SpiffeError::Path),
            ("spiffe://td", SpiffeError::Path),
            ("spiffe://td/control/x", SpiffeError::Path),
            ("spiffe://td//b1", SpiffeError::Path),
            (
                "spiffe://td/robot/b1",
                SpiffeError::UnknownKind("robot".into()),
            ),
        ] {
            assert_eq!(SpiffeRef::parse(uri).unwrap_err(), err, "{uri}");
        }
        for uri in [
            "spiffe://td/broker/b1/extra",
            "spiffe://TD/broker/b1",
            "spiffe:///broker/b1",
            "spiffe://td/broker/..",
            "spiffe://td/appliance/.",
            "spiffe://td/broker/",
            "spiffe://td/broker/b 1",
            "spiffe://td:443/broker/b1",
            "spiffe://u@td/broker/b1",
            "spiffe://td/broker/b1?x",
            "spiffe://td/broker/b1#x",
            "spiffe://td/broker/%2e%2e",
        ] {
            assert!(SpiffeRef::parse(uri).is_err(), "{uri}");
        }
        let long = format!("spiffe://td/appliance/{}", "a".repeat(2100));
        assert_eq!(SpiffeRef::parse(&long).unwrap_err(), SpiffeError::TooLong);
    }
}
