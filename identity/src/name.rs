//! The id types and their one validation rule each.
//!
//! - **Names** ([`ApplianceId`], [`BrokerName`], [`OperatorName`]): 1 to [`MAX_NAME_LEN`]
//!   (128) bytes, each an ASCII letter, digit, `.`, `_` or `-`; never exactly `.` or `..`
//!   (a name is a path segment of a SPIFFE id, a file name in data directories and a URL
//!   path segment of the API, where those two mean something else). Case is kept and
//!   significant.
//! - **Trust domains** ([`TrustDomain`]): 1 to [`MAX_TRUST_DOMAIN_LEN`] (255) bytes of
//!   lowercase ASCII letters, digits, `.`, `_` and `-` (the SPIFFE trust-domain alphabet).
//!
//! The types hold an `Arc<str>`: the broker shares one appliance id between its allowlist
//! and every session of that appliance without copying it.

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

/// Longest appliance id, broker name or operator name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Longest trust domain, in bytes (SPIFFE's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Which part of the rule a name broke. The message states the rule, so it can go to a
/// user as is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} must not be empty (1-{max} characters of [{alphabet}])")]
    Empty {
        /// What was being named (`appliance id`, `broker name`, ...).
        kind: &'static str,
        /// The longest allowed.
        max: usize,
        /// The allowed characters.
        alphabet: &'static str,
    },
    /// The name is longer than allowed.
    #[error("{kind} is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// What was being named.
        kind: &'static str,
        /// Its length, bytes.
        len: usize,
        /// The longest allowed.
        max: usize,
    },
    /// The name is `.` or `..`.
    #[error("{kind} must not be `.` or `..`")]
    Dots {
        /// What was being named.
        kind: &'static str,
    },
    /// A character outside the alphabet.
    #[error("{kind} may contain only [{alphabet}]; found {found:?} at byte {at}")]
    BadCharacter {
        /// What was being named.
        kind: &'static str,
        /// The allowed characters.
        alphabet: &'static str,
        /// The first offending character.
        found: char,
        /// Its byte offset.
        at: usize,
    },
}

impl NameError {
    /// The stable machine-readable code clients see (`invalid_name` for every name kind,
    /// `invalid_trust_domain` for trust domains).
    pub fn code(&self) -> &'static str {
        let kind = match self {
            NameError::Empty { kind, .. }
            | NameError::TooLong { kind, .. }
            | NameError::Dots { kind }
            | NameError::BadCharacter { kind, .. } => *kind,
        };
        if kind == TrustDomain::KIND {
            "invalid_trust_domain"
        } else {
            "invalid_name"
        }
    }
}

const NAME_ALPHABET: &str = "A-Za-z0-9._-";
const TRUST_DOMAIN_ALPHABET: &str = "a-z0-9._-";

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn trust_domain_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
}

/// The name rule (see the module documentation), for a name of kind `kind`.
pub fn check_name(kind: &'static str, s: &str) -> Result<(), NameError> {
    check(kind, s, MAX_NAME_LEN, NAME_ALPHABET, name_byte)?;
    if s == "." || s == ".." {
        return Err(NameError::Dots { kind });
    }
    Ok(())
}

/// The trust-domain rule (see the module documentation).
pub fn check_trust_domain(s: &str) -> Result<(), NameError> {
    check(
        TrustDomain::KIND,
        s,
        MAX_TRUST_DOMAIN_LEN,
        TRUST_DOMAIN_ALPHABET,
        trust_domain_byte,
    )
}

#[inline]
fn check(
    kind: &'static str,
    s: &str,
    max: usize,
    alphabet: &'static str,
    allowed: fn(u8) -> bool,
) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty {
            kind,
            max,
            alphabet,
        });
    }
    if s.len() > max {
        return Err(NameError::TooLong {
            kind,
            len: s.len(),
            max,
        });
    }
    if let Some(at) = s.bytes().position(|b| !allowed(b)) {
        // `at` may fall inside a multi-byte character: report the character it starts.
        let start = (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        let found = s[start..].chars().next().unwrap_or('\u{fffd}');
        return Err(NameError::BadCharacter {
            kind,
            alphabet,
            found,
            at: start,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// What this type names, as error messages say it.
            pub const KIND: &'static str = $kind;

            /// Validate and wrap `s`.
            pub fn new(s: &str) -> Result<$name, NameError> {
                ($check)(s)?;
                Ok($name(Arc::from(s)))
            }

            /// Wrap `s` that [`crate::spiffe::SpiffeRef::parse`] already checked with
            /// this type's rule: the handshake validates each name once, not twice.
            pub(crate) fn from_checked(s: &str) -> $name {
                debug_assert!(($check)(s).is_ok());
                $name(Arc::from(s))
            }

            /// Whether `s` is valid.
            pub fn is_valid(s: &str) -> bool {
                ($check)(s).is_ok()
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<$name, NameError> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<$name, NameError> {
                ($check)(&s)?;
                Ok($name(Arc::from(s)))
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// An appliance id: the `<id>` of `spiffe://<td>/appliance/<id>` (the name rule).
    ApplianceId,
    "appliance id",
    |s| check_name("appliance id", s)
);
id_type!(
    /// A broker name: the `<name>` of `spiffe://<td>/broker/<name>` (the name rule).
    BrokerName,
    "broker name",
    |s| check_name("broker name", s)
);
id_type!(
    /// An operator name: the `<name>` of `spiffe://<td>/operator/<name>` (the name rule).
    OperatorName,
    "operator name",
    |s| check_name("operator name", s)
);
id_type!(
    /// A SPIFFE trust domain: 1–255 bytes of `[a-z0-9._-]`.
    TrustDomain,
    "trust domain",
    check_trust_domain
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_rule() {
        for ok in [
            "a",
            "A-1",
            "app_1.example",
            "...",
            ".a",
            "a..",
            &"x".repeat(128),
        ] {
            assert!(ApplianceId::is_valid(ok), "{ok:?}");
            assert!(BrokerName::is_valid(ok), "{ok:?}");
            assert!(OperatorName::is_valid(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            " a",
            "é",
            "a\n",
            "a%2e",
            &"x".repeat(129),
        ] {
            assert!(!ApplianceId::is_valid(bad), "{bad:?}");
            assert!(!BrokerName::is_valid(bad), "{bad:?}");
            assert!(!OperatorName::is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_broken_rule() {
        assert_eq!(
            ApplianceId::new("..").unwrap_err(),
            NameError::Dots {
                kind: "appliance id"
            }
        );
        assert_eq!(
            BrokerName::new("aé").unwrap_err(),
            NameError::BadCharacter {
                kind: "broker name",
                alphabet: NAME_ALPHABET,
                found: 'é',
                at: 1
            }
        );
        assert_eq!(
            OperatorName::new(&"x".repeat(129)).unwrap_err().to_string(),
            "operator name is 129 characters long; at most 128 are allowed"
        );
        assert_eq!(ApplianceId::new("").unwrap_err().code(), "invalid_name");
        assert_eq!(
            TrustDomain::new("Acme").unwrap_err().code(),
            "invalid_trust_domain"
        );
    }

    #[test]
    fn trust_domains_are_lowercase() {
        assert!(TrustDomain::is_valid("acme.example"));
        assert!(TrustDomain::is_valid(&"a".repeat(255)));
        for bad in ["", "Acme", "a/b", "a:443", &"a".repeat(256)] {
            assert!(!TrustDomain::is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn serde_validates() {
        let id: ApplianceId = serde_json::from_str("\"app-1\"").unwrap();
        assert_eq!(id, "app-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"app-1\"");
        assert!(serde_json::from_str::<ApplianceId>("\"..\"").is_err());
    }
}
