//! The one SAN URI of a certificate, read and checked the same way by every verifier.
//!
//! A Tether certificate carries exactly one SAN URI (SPIFFE X.509-SVIDs allow no more),
//! and it is a [`SpiffeRef`] of the verifier's trust domain. Other SAN types (the DNS names
//! and IPs of broker and control certificates) are ignored here.

use thiserror::Error;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::name::TrustDomain;
use crate::spiffe::{Kind, SpiffeError, SpiffeRef};

/// Why a certificate has no single SAN URI.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SanError {
    /// The certificate or its SAN extension does not parse.
    #[error("malformed certificate")]
    Malformed,
    /// No SAN URI (or no SAN extension).
    #[error("certificate has no SAN URI")]
    NoUri,
    /// More than one SAN URI.
    #[error("certificate has {0} SAN URIs, exactly one is allowed")]
    MultipleUris(usize),
}

/// Why a certificate names no identity of the expected trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not exactly one SAN URI.
    #[error(transparent)]
    San(#[from] SanError),
    /// The URI is not a Tether SPIFFE id.
    #[error("SAN URI is not a Tether identity: {0}")]
    NotSpiffe(SpiffeError),
    /// A valid id of another trust domain.
    #[error("certificate names a {kind} of trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// The verifier's trust domain.
        expected: String,
        /// The certificate's.
        found: String,
        /// The kind it names.
        kind: Kind,
    },
}

/// The single SAN URI of `cert`.
pub fn single_san_uri<'a>(cert: &'a X509Certificate<'_>) -> Result<&'a str, SanError> {
    let san = match cert.subject_alternative_name() {
        Ok(Some(san)) => san,
        Ok(None) => return Err(SanError::NoUri),
        Err(_) => return Err(SanError::Malformed),
    };
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.count()) {
        (None, _) => Err(SanError::NoUri),
        (Some(u), 0) => Ok(u),
        (Some(_), more) => Err(SanError::MultipleUris(more + 1)),
    }
}

/// The SPIFFE id `cert` names, which must be of trust domain `td`: the check every
/// verifier (broker, agent, control) makes after the chain.
pub fn spiffe_id<'a>(
    cert: &'a X509Certificate<'_>,
    td: &TrustDomain,
) -> Result<SpiffeRef<'a>, IdentityError> {
    let uri = single_san_uri(cert)?;
    let id = SpiffeRef::parse(uri).map_err(IdentityError::NotSpiffe)?;
    if id.trust_domain() != td.as_str() {
        return Err(IdentityError::WrongTrustDomain {
            expected: td.to_string(),
            found: id.trust_domain().to_owned(),
            kind: id.kind(),
        });
    }
    Ok(id)
}

/// [`spiffe_id`] on a DER certificate, owned.
pub fn spiffe_id_der(der: &[u8], td: &TrustDomain) -> Result<crate::SpiffeId, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| SanError::Malformed)?;
    spiffe_id(&cert, td).map(|id| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::Subject;

    fn cert(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .chain(std::iter::once(rcgen::SanType::DnsName(
                "localhost".try_into().unwrap(),
            )))
            .collect();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_one_uri() {
        let td = TrustDomain::new("td").unwrap();
        let id = spiffe_id_der(&cert(&["spiffe://td/appliance/a"]), &td).unwrap();
        assert!(matches!(id.subject, Subject::Appliance(ref a) if a == "a"));
        assert_eq!(
            spiffe_id_der(&cert(&[]), &td).unwrap_err(),
            IdentityError::San(SanError::NoUri)
        );
        assert_eq!(
            spiffe_id_der(
                &cert(&["spiffe://td/appliance/a", "spiffe://td/appliance/b"]),
                &td
            )
            .unwrap_err(),
            IdentityError::San(SanError::MultipleUris(2))
        );
        assert_eq!(
            spiffe_id_der(&cert(&["spiffe://other/broker/b"]), &td).unwrap_err(),
            IdentityError::WrongTrustDomain {
                expected: "td".into(),
                found: "other".into(),
                kind: Kind::Broker
            }
        );
        assert!(matches!(
            spiffe_id_der(&cert(&["spiffe://td/appliance/.."]), &td).unwrap_err(),
            IdentityError::NotSpiffe(SpiffeError::Name(_))
        ));
        assert_eq!(
            spiffe_id_der(b"junk", &td).unwrap_err(),
            IdentityError::San(SanError::Malformed)
        );
    }
}
