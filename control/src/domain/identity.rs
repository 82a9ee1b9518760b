//! Who a verified client certificate names.
//!
//! rustls has already checked the chain, validity and clientAuth (the HTTP layer's TLS
//! config); this reads the one SPIFFE URI the certificate must carry
//! with [`tether_identity::cert::spiffe_id`], the check every Tether verifier makes, and
//! says which kind of identity it is. Anything else — no SAN, several URIs, another trust
//! domain, control's own id, a bad name — is no identity at all.

use tether_identity::cert::{IdentityError as CertIdentityError, SanError};
use tether_identity::{Subject, TrustDomain};

/// An identity issued by this control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// `spiffe://<td>/appliance/<id>`
    Appliance(String),
    /// `spiffe://<td>/operator/<name>`
    Operator(String),
    /// `spiffe://<td>/broker/<name>`
    Broker(String),
}

/// Why a certificate names no usable identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a parseable X.509 certificate.
    #[error("the client certificate cannot be parsed")]
    Malformed,
    /// Zero or several SAN URIs.
    #[error("the client certificate must carry exactly one SAN URI")]
    UriCount,
    /// A URI outside our trust domain or of an unknown kind.
    #[error("the client certificate does not name an identity of this trust domain")]
    Foreign,
}

/// The identity in `der` for trust domain `td`.
pub fn identify(der: &[u8], td: &str) -> Result<PeerIdentity, IdentityError> {
    let td = TrustDomain::new(td).map_err(|_| IdentityError::Foreign)?;
    let id = tether_identity::cert::spiffe_id_der(der, &td).map_err(|e| match e {
        CertIdentityError::San(SanError::Malformed) => IdentityError::Malformed,
        CertIdentityError::San(_) => IdentityError::UriCount,
        _ => IdentityError::Foreign,
    })?;
    match id.subject {
        Subject::Appliance(id) => Ok(PeerIdentity::Appliance(id.to_string())),
        Subject::Operator(name) => Ok(PeerIdentity::Operator(name.to_string())),
        Subject::Broker(name) => Ok(PeerIdentity::Broker(name.to_string())),
        Subject::Control => Err(IdentityError::Foreign),
    }
}
