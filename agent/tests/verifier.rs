//! BrokerVerifier: which broker certificates an agent accepts, and the exact refusal for
//! each one it must not.

mod common;

use common::{broker, Ca, Leaf};
use rcgen::ExtendedKeyUsagePurpose as Eku;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::CertificateError;
use tether_agent::{broker_verifier, BrokerCertError, BrokerVerifier, CredentialError};
use tether_identity::Kind;

const TD: &str = "acme.test";

fn now() -> UnixTime {
    UnixTime::now()
}

fn verifier(ca: &Ca) -> BrokerVerifier {
    broker_verifier(&[ca.der()], TD).expect("verifier")
}

#[test]
fn accepts_a_broker_of_our_trust_domain_whatever_the_address() {
    let ca = Ca::new("ca");
    let b = broker(&ca, TD, "edge-1");
    let v = verifier(&ca);
    let verified = v.verify(&b.der(), &[], now()).expect("accepted");
    assert_eq!(verified.name(), Some("edge-1"));
    assert_eq!(verified.trust_domain().as_str(), TD);
    // Through the rustls trait, with an IP address as server name (not checked).
    let name = ServerName::try_from("192.0.2.7").unwrap();
    assert!(v
        .verify_server_cert(&b.der(), &[], &name, &[], now())
        .is_ok());
}

#[test]
fn accepts_a_broker_behind_an_intermediate() {
    let root = Ca::new("root");
    let mut inter_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    inter_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    inter_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    inter_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let inter_key = rcgen::KeyPair::generate().unwrap();
    let inter_cert = inter_params
        .signed_by(
            &inter_key,
            &rcgen::Issuer::from_params(&root.params, &root.key),
        )
        .unwrap();
    let inter = Ca {
        params: inter_params,
        key: inter_key,
        cert: inter_cert,
    };
    let b = broker(&inter, TD, "edge-2");
    let v = verifier(&root);
    assert!(v.verify(&b.der(), &[inter.der()], now()).is_ok());
    // Without the intermediate it does not chain.
    assert_eq!(
        v.verify(&b.der(), &[], now()).unwrap_err(),
        BrokerCertError::Chain(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn broker_of_another_trust_domain_is_refused() {
    let ca = Ca::new("ca");
    let b = broker(&ca, "evil.test", "edge-1");
    assert_eq!(
        verifier(&ca).verify(&b.der(), &[], now()).unwrap_err(),
        BrokerCertError::WrongTrustDomain {
            expected: TD.into(),
            found: "evil.test".into(),
            kind: Kind::Broker,
        }
    );
}

#[test]
fn appliance_cannot_present_as_a_broker() {
    let ca = Ca::new("ca");
    let uri = format!("spiffe://{TD}/appliance/app-1");
    let leaf = ca.issue(Leaf {
        common_name: "app-1",
        uris: vec![&uri],
        ekus: vec![Eku::ServerAuth, Eku::ClientAuth],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: None,
    });
    let v = verifier(&ca);
    assert_eq!(
        v.verify(&leaf.der(), &[], now()).unwrap_err(),
        BrokerCertError::WrongIdentity {
            expected: Kind::Broker,
            found: "an identity of kind appliance".into()
        }
    );
    // Through rustls the refusal becomes a "not valid for name" certificate error.
    let name = ServerName::try_from("broker").unwrap();
    assert_eq!(
        v.verify_server_cert(&leaf.der(), &[], &name, &[], now())
            .unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
    );
}

#[test]
fn broker_signed_by_another_ca_is_refused() {
    let ca = Ca::new("ca");
    let rogue = Ca::new("rogue");
    let b = broker(&rogue, TD, "edge-1");
    assert_eq!(
        verifier(&ca).verify(&b.der(), &[], now()).unwrap_err(),
        BrokerCertError::Chain(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn expired_broker_certificate_is_refused() {
    let ca = Ca::new("ca");
    let uri = format!("spiffe://{TD}/broker/old");
    let b = ca.issue(Leaf {
        common_name: "old",
        uris: vec![&uri],
        ekus: vec![Eku::ServerAuth],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: Some(((2020, 1, 1), (2021, 1, 1))),
    });
    let err = verifier(&ca).verify(&b.der(), &[], now()).unwrap_err();
    assert!(
        matches!(
            err,
            BrokerCertError::Chain(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ),
        "{err:?}"
    );
}

#[test]
fn broker_certificate_without_server_auth_is_refused() {
    let ca = Ca::new("ca");
    let uri = format!("spiffe://{TD}/broker/client-only");
    // clientAuth only: webpki refuses the purpose.
    let b = ca.issue(Leaf {
        common_name: "client-only",
        uris: vec![&uri],
        ekus: vec![Eku::ClientAuth],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: None,
    });
    let err = verifier(&ca).verify(&b.der(), &[], now()).unwrap_err();
    assert!(
        matches!(
            err,
            BrokerCertError::Chain(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ),
        "{err:?}"
    );
    // No EKU extension at all: webpki would allow it, the agent does not.
    let uri = format!("spiffe://{TD}/broker/no-eku");
    let b = ca.issue(Leaf {
        common_name: "no-eku",
        uris: vec![&uri],
        ekus: vec![],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: None,
    });
    assert_eq!(
        verifier(&ca).verify(&b.der(), &[], now()).unwrap_err(),
        BrokerCertError::MissingServerAuth
    );
}

#[test]
fn building_with_no_ca_is_an_error() {
    assert_eq!(
        broker_verifier(&[], TD).unwrap_err(),
        CredentialError::NoCaCertificate
    );
}

#[test]
fn several_pinned_cas_each_work() {
    let ca1 = Ca::new("ca1");
    let ca2 = Ca::new("ca2");
    let v = broker_verifier(&[ca1.der(), ca2.der()], TD).unwrap();
    assert!(v.verify(&broker(&ca1, TD, "a").der(), &[], now()).is_ok());
    assert!(v.verify(&broker(&ca2, TD, "b").der(), &[], now()).is_ok());
}

#[test]
fn broker_certificate_with_two_uris_is_refused() {
    let ca = Ca::new("ca");
    let ours = format!("spiffe://{TD}/broker/edge-1");
    let other = "spiffe://evil.test/broker/edge-1".to_string();
    let b = ca.issue(Leaf {
        common_name: "two-uris",
        uris: vec![&other, &ours],
        ekus: vec![Eku::ServerAuth],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: None,
    });
    assert_eq!(
        verifier(&ca).verify(&b.der(), &[], now()).unwrap_err(),
        BrokerCertError::MultipleSanUris(2)
    );
}
