//! Single use of approvals (design §1.6), as pure state for the agent to persist.
//!
//! An id is refused if it was seen, or if its window ended at or before the **horizon**:
//! the latest `not_after_ms` of everything pruned so far. Pruning forgets ids whose
//! window ended more than the clock skew ago (they would fail the time check anyway)
//! and raises the horizon, so setting the clock back and replaying a pruned approval
//! still fails. The agent records an id (durably, before the command starts) only after
//! every other check passed.

use std::collections::HashMap;

use crate::{CommandFailure, Refusal};

/// Seen approval ids and the pruning horizon.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    seen: HashMap<String, i64>,
    horizon_ms: i64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// `approval_replayed` if `id` (valid until `not_after_ms`) may not be used.
    pub fn check(&self, id: &str, not_after_ms: i64) -> Result<(), Refusal> {
        if self.seen.contains_key(id) {
            return Err(Refusal::new(
                CommandFailure::ApprovalReplayed,
                format!("approval {id} was used before"),
            ));
        }
        if not_after_ms <= self.horizon_ms {
            return Err(Refusal::new(
                CommandFailure::ApprovalReplayed,
                format!(
                    "approval {id} ends at or before the pruning horizon {} (approvals that old are forgotten and refused)",
                    crate::format_rfc3339_ms(self.horizon_ms)
                ),
            ));
        }
        Ok(())
    }

    /// Record `id` as used (also when replaying the audit log at start).
    pub fn record(&mut self, id: &str, not_after_ms: i64) {
        self.seen.insert(id.to_owned(), not_after_ms);
    }

    /// Forget ids whose window ended before `now_ms - skew_ms`, raising the horizon.
    pub fn prune(&mut self, now_ms: i64, skew_ms: i64) {
        let cutoff = now_ms.saturating_sub(skew_ms);
        let mut horizon = self.horizon_ms;
        self.seen.retain(|_, &mut until| {
            if until < cutoff {
                horizon = horizon.max(until);
                false
            } else {
                true
            }
        });
        self.horizon_ms = horizon;
    }

    /// The horizon.
    pub fn horizon_ms(&self) -> i64 {
        self.horizon_ms
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_and_never_again_even_after_pruning_and_a_clock_set_back() {
        let mut l = Ledger::new();
        l.check("a", 1_000).unwrap();
        l.record("a", 1_000);
        assert_eq!(
            l.check("a", 1_000).unwrap_err().code,
            CommandFailure::ApprovalReplayed
        );
        // Time passes: "a" is pruned, the horizon remembers it.
        l.prune(100_000, 60_000);
        assert!(l.is_empty());
        assert_eq!(l.horizon_ms(), 1_000);
        // The clock is set back: "a" would be in its window again, and is still refused.
        assert_eq!(
            l.check("a", 1_000).unwrap_err().code,
            CommandFailure::ApprovalReplayed
        );
        assert_eq!(
            l.check("b", 999).unwrap_err().code,
            CommandFailure::ApprovalReplayed
        );
        l.check("c", 1_001).unwrap();
    }
}
