//! The chain: every entry carries the hash of the one before (`prev_hash`), so
//! [`verify_chain`] finds an edited, removed or reordered entry.
//!
//! # What the chain proves, and what it does not
//!
//! [`verify_chain`] (or a [`ChainVerifier`] fed page by page) reports the first entry
//! that does not fit: an edited entry (its hash no longer matches), an entry removed
//! from the middle or entries reordered (`seq` not consecutive), an entry replaced with
//! its hash recomputed (the next entry's `prev_hash` no longer matches), a first entry
//! `seq` 1 whose `prev_hash` is not all zeros.
//!
//! The chain alone cannot show that entries are **missing at the end**: a log cut after
//! entry `n` is a valid chain of `n` entries. Nor can it resist someone who can write the
//! table and recompute every hash from the first changed entry onwards. Both need an
//! anchor held outside the database, a checkpoint (`seq` and `hash` of a recent entry,
//! published or signed): [`ChainVerifier::after`] resumes from one, and a log whose head
//! is older than the last checkpoint was cut. Control signs such checkpoints with its own
//! certificate ([`crate::checkpoint`]: the signed string, the signer rules; control's
//! `serve` writes one every `[audit] checkpoint_every`), exports the log with them
//! ([`crate::export`]: the JSON lines format), and `tether audit verify` checks an export
//! offline against a root the operator holds; [`crate::export`] says exactly what that
//! detects and what it cannot (entries after the last checkpoint). Inside control's
//! database, triggers refusing `UPDATE`, `DELETE` and `TRUNCATE` on `audit_log` and
//! `audit_checkpoints` are a first guard.

use thiserror::Error;

use crate::entry::{AuditEntry, EventError};
use crate::hash::GENESIS_HASH;

/// Why a chain does not verify. [`ChainError::first_bad_seq`] is the first position that
/// does not hold what it should.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The entry's hash is not the hash of its contents: it was edited.
    #[error("audit entry {seq}: the hash does not match the contents (edited)")]
    HashMismatch {
        /// The entry.
        seq: i64,
    },
    /// The entry's `prev_hash` is not the previous entry's hash (or, for entry 1, not
    /// all zeros): an entry before it was replaced or re-hashed.
    #[error("audit entry {seq}: prev_hash does not match the previous entry")]
    BrokenLink {
        /// The entry.
        seq: i64,
    },
    /// Entry `expected` should come next, but `found` does: entries were removed or
    /// reordered (or the log does not start at 1).
    #[error("audit entry {expected} expected, found entry {found} (removed or reordered)")]
    OutOfSequence {
        /// The seq that should be there.
        expected: i64,
        /// The seq that is.
        found: i64,
    },
    /// The entry's details have no canonical form, so it cannot have been written by
    /// control as it is.
    #[error("audit entry {seq}: {reason}")]
    Unhashable {
        /// The entry.
        seq: i64,
        /// Why.
        reason: EventError,
    },
}

impl ChainError {
    /// The first seq whose entry is wrong or missing.
    pub fn first_bad_seq(&self) -> i64 {
        match self {
            ChainError::HashMismatch { seq }
            | ChainError::BrokenLink { seq }
            | ChainError::Unhashable { seq, .. } => *seq,
            ChainError::OutOfSequence { expected, .. } => *expected,
        }
    }
}

/// Checks entries one at a time, in order: for a log read page by page.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    /// The seq and hash the next entry must follow; `None`: take the first entry's
    /// `seq` and `prev_hash` as given.
    head: Option<(i64, String)>,
    checked: u64,
}

impl ChainVerifier {
    /// Expect the whole log: the first entry is seq 1 with `prev_hash` [`GENESIS_HASH`].
    pub fn from_genesis() -> Self {
        Self::after(0, GENESIS_HASH.to_owned())
    }

    /// Expect the entry after a known one (a checkpoint): seq `seq + 1` with `prev_hash`
    /// `hash`.
    pub fn after(seq: i64, hash: String) -> Self {
        ChainVerifier {
            head: Some((seq, hash)),
            checked: 0,
        }
    }

    /// Accept whatever the first entry says it follows (a page of the log, unanchored).
    pub fn unanchored() -> Self {
        ChainVerifier {
            head: None,
            checked: 0,
        }
    }

    /// Check the next entry.
    pub fn push(&mut self, entry: &AuditEntry) -> Result<(), ChainError> {
        if let Some((seq, hash)) = &self.head {
            let expected = seq.saturating_add(1);
            if entry.seq != expected {
                return Err(ChainError::OutOfSequence {
                    expected,
                    found: entry.seq,
                });
            }
            if entry.prev_hash != *hash {
                return Err(ChainError::BrokenLink { seq: entry.seq });
            }
        }
        let computed = entry
            .computed_hash()
            .map_err(|reason| ChainError::Unhashable {
                seq: entry.seq,
                reason,
            })?;
        if computed != entry.hash {
            return Err(ChainError::HashMismatch { seq: entry.seq });
        }
        self.head = Some((entry.seq, entry.hash.clone()));
        self.checked += 1;
        Ok(())
    }

    /// The last entry checked (seq and hash), if any: a checkpoint to resume from.
    pub fn head(&self) -> Option<(i64, &str)> {
        match &self.head {
            Some((seq, hash)) if self.checked > 0 => Some((*seq, hash.as_str())),
            _ => None,
        }
    }

    /// How many entries were checked.
    pub fn checked(&self) -> u64 {
        self.checked
    }
}

/// Check that `entries` are one unbroken stretch of the chain; `Err` names the first bad
/// entry. When the first entry is seq 1 its `prev_hash` must be [`GENESIS_HASH`];
/// otherwise the stretch is taken to start where its first entry says (a page). To check
/// a whole log, also require that it starts at 1 (or use
/// [`ChainVerifier::from_genesis`]); see the module docs for what no chain can show.
pub fn verify_chain(entries: &[AuditEntry]) -> Result<(), ChainError> {
    let mut v = match entries.first() {
        None => return Ok(()),
        Some(first) if first.seq == 1 => ChainVerifier::from_genesis(),
        Some(_) => ChainVerifier::unanchored(),
    };
    entries.iter().try_for_each(|e| v.push(e))
}
