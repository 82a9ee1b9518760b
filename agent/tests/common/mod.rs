//! Test PKI made with rcgen: a CA, appliance and broker certificates.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SignatureAlgorithm,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct Ca {
    pub params: CertificateParams,
    pub key: KeyPair,
    pub cert: rcgen::Certificate,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { params, key, cert }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Issue a leaf with the given SAN URIs, EKUs and key algorithm.
    pub fn issue(&self, leaf: Leaf<'_>) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        params.subject_alt_names = leaf
            .uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        params.extended_key_usages = leaf.ekus;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if let Some((nb, na)) = leaf.validity {
            params.not_before = rcgen::date_time_ymd(nb.0, nb.1, nb.2);
            params.not_after = rcgen::date_time_ymd(na.0, na.1, na.2);
        }
        let key = KeyPair::generate_for(leaf.alg).unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Issued { cert, key }
    }
}

/// A date as (year, month, day).
pub type Ymd = (i32, u8, u8);

pub struct Leaf<'a> {
    pub common_name: &'a str,
    pub uris: Vec<&'a str>,
    pub ekus: Vec<ExtendedKeyUsagePurpose>,
    pub alg: &'static SignatureAlgorithm,
    /// (not_before, not_after) as (year, month, day).
    pub validity: Option<(Ymd, Ymd)>,
}

pub struct Issued {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Issued {
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

pub fn appliance(ca: &Ca, td: &str, id: &str, alg: &'static SignatureAlgorithm) -> Issued {
    let uri = format!("spiffe://{td}/appliance/{id}");
    ca.issue(Leaf {
        common_name: id,
        uris: vec![&uri],
        ekus: vec![ExtendedKeyUsagePurpose::ClientAuth],
        alg,
        validity: None,
    })
}

pub fn broker(ca: &Ca, td: &str, name: &str) -> Issued {
    let uri = format!("spiffe://{td}/broker/{name}");
    ca.issue(Leaf {
        common_name: name,
        uris: vec![&uri],
        ekus: vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: None,
    })
}
