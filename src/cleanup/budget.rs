//! `limits.maxDeletionPercent`: whether a repository's deletions stay within the budget, the
//! fingerprint a person approves when they do not, and the approval annotation's value.
//!
//! The fingerprint is FNV-1a (64 bit) over the repository path and the sorted names to
//! delete: defined, so the same plan has the same fingerprint in every process and version,
//! and any change to the set (one tag more or less) gives another one.

use std::collections::BTreeSet;

/// Why a repository's deletions wait, for status (`status.lastRun.pendingApproval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingApproval {
    /// Repository path, `my-org/app/api`.
    pub repository: String,
    pub would_delete: usize,
    pub total: usize,
    pub fingerprint: String,
}

/// The answer for one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetVerdict {
    /// Within the budget (or no budget): delete.
    Within,
    /// Over the budget, but this exact set was approved: delete.
    Approved { fingerprint: String },
    /// Over the budget and not approved: delete nothing here.
    NeedsApproval(PendingApproval),
}

/// Checks `names` (the tags a run would delete from `repository`, of `total` tags) against
/// `max_percent` (1..=100; `None`: no budget) and the approved fingerprints. More than
/// `max_percent` % needs approval; exactly `max_percent` % does not.
pub fn check_budget<S: AsRef<str>>(
    repository: &str,
    names: &[S],
    total: usize,
    max_percent: Option<u8>,
    approved: &BTreeSet<String>,
) -> BudgetVerdict {
    let Some(max_percent) = max_percent else {
        return BudgetVerdict::Within;
    };
    let would_delete = names.len();
    // would_delete / total > max_percent / 100, in integers.
    let over = (would_delete as u128) * 100 > (total as u128) * u128::from(max_percent);
    if would_delete == 0 || !over {
        return BudgetVerdict::Within;
    }
    let fingerprint = fingerprint(repository, names);
    if approved.contains(&fingerprint) {
        BudgetVerdict::Approved { fingerprint }
    } else {
        BudgetVerdict::NeedsApproval(PendingApproval {
            repository: repository.to_owned(),
            would_delete,
            total,
            fingerprint,
        })
    }
}

/// 16 hex digits identifying the repository and the exact set of names (order-independent).
pub fn fingerprint<S: AsRef<str>>(repository: &str, names: &[S]) -> String {
    let sorted: BTreeSet<&str> = names.iter().map(AsRef::as_ref).collect();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(repository.as_bytes());
    for name in sorted {
        // A byte no tag name or path contains separates the parts, so that moving characters
        // from one name to the next changes the hash.
        feed(&[0]);
        feed(name.as_bytes());
    }
    format!("{hash:016x}")
}

/// The fingerprints of an annotation value `fp[,fp…]` (spaces around commas allowed,
/// case-insensitive hex, empty parts ignored).
pub fn parse_approvals(value: &str) -> BTreeSet<String> {
    value
        .split(',')
        .map(|part| part.trim().to_ascii_lowercase())
        .filter(|part| !part.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_percentage_needs_approval_exactly_at_it_does_not() {
        let none = BTreeSet::new();
        let four = ["a", "b", "c", "d"];
        assert_eq!(
            check_budget("r", &four[..2], 4, Some(50), &none),
            BudgetVerdict::Within
        );
        let BudgetVerdict::NeedsApproval(pending) =
            check_budget("r", &four[..3], 4, Some(50), &none)
        else {
            panic!("3 of 4 is over 50%");
        };
        assert_eq!((pending.would_delete, pending.total), (3, 4));
        assert_eq!(pending.fingerprint, fingerprint("r", &["c", "a", "b"]));
        assert_eq!(
            check_budget("r", &four, 4, None, &none),
            BudgetVerdict::Within
        );
        assert_eq!(
            check_budget("r", &four, 4, Some(100), &none),
            BudgetVerdict::Within
        );
        let empty: [&str; 0] = [];
        assert_eq!(
            check_budget("r", &empty, 0, Some(1), &none),
            BudgetVerdict::Within
        );
    }

    #[test]
    fn an_approval_covers_exactly_its_set() {
        let approved = parse_approvals(&format!(
            " {} ,,X",
            fingerprint("r", &["a", "b"]).to_uppercase()
        ));
        assert!(approved.contains("x"));
        assert!(matches!(
            check_budget("r", &["b", "a"], 3, Some(50), &approved),
            BudgetVerdict::Approved { .. }
        ));
        assert!(matches!(
            check_budget("r", &["a", "b", "c"], 3, Some(50), &approved),
            BudgetVerdict::NeedsApproval(_)
        ));
        assert!(matches!(
            check_budget("other", &["a", "b"], 3, Some(50), &approved),
            BudgetVerdict::NeedsApproval(_)
        ));
    }

    #[test]
    fn fingerprints_are_stable_and_separate_names() {
        // Fixed value: the same plan must have the same fingerprint in every process.
        assert_eq!(
            fingerprint("acme/app", &["v1", "v2"]),
            fingerprint("acme/app", &["v2", "v1"])
        );
        assert_eq!(fingerprint("acme/app", &["v1", "v2"]).len(), 16);
        assert_ne!(
            fingerprint("r", &["ab", "c"]),
            fingerprint("r", &["a", "bc"])
        );
        assert_eq!(fingerprint("", &[] as &[&str]), "cbf29ce484222325");
    }
}
