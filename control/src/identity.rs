//! Who a verified client certificate names.
//!
//! rustls has already checked the chain, validity and clientAuth (see
//! [`crate::server::tls_config`]); this reads the one SPIFFE URI the certificate must carry
//! and says which kind of identity it is. Anything else — no SAN, several URIs, another
//! trust domain, an unknown kind, a bad name — is no identity at all.

use x509_parser::extensions::GeneralName;

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
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Malformed)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Malformed)?
        .ok_or(IdentityError::UriCount)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(IdentityError::UriCount);
    };
    let path = uri
        .strip_prefix("spiffe://")
        .and_then(|r| r.strip_prefix(td))
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(IdentityError::Foreign)?;
    let (kind, name) = path.split_once('/').ok_or(IdentityError::Foreign)?;
    if !crate::enroll::valid_appliance_id(name) {
        return Err(IdentityError::Foreign);
    }
    match kind {
        "appliance" => Ok(PeerIdentity::Appliance(name.to_owned())),
        "operator" => Ok(PeerIdentity::Operator(name.to_owned())),
        "broker" => Ok(PeerIdentity::Broker(name.to_owned())),
        _ => Err(IdentityError::Foreign),
    }
}
