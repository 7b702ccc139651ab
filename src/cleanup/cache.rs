//! Which cache entries of an upstream (container virtual registry) have expired under
//! `cacheRules.notDownloadedFor`.
//!
//! An entry's last use is the later of its `downloaded_at` and its `created_at`: an entry
//! never downloaded counts from when it was cached, and an entry cached again after its last
//! download is as fresh as the new copy. It expires when its last use lies strictly before
//! `now - not_downloaded_for`; a last use in the future (clock skew) never expires.

use std::time::Duration;

use jiff::Timestamp;

/// One cache entry, as `GET /virtual_registries/container/upstreams/:id/cache_entries` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntryInfo {
    /// GitLab's opaque entry id (a base64 string).
    pub id: String,
    /// e.g. `library/nginx/manifests/latest`.
    pub relative_path: String,
    pub downloaded_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

impl CacheEntryInfo {
    /// When the entry was last downloaded or, failing that, cached.
    pub fn last_used(&self) -> Timestamp {
        match self.downloaded_at {
            Some(downloaded) => downloaded.max(self.created_at),
            None => self.created_at,
        }
    }
}

/// The expired entries, least recently used first (ties by id), and what was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSelection<'a> {
    pub expired: Vec<&'a CacheEntryInfo>,
    pub evaluated: usize,
    pub kept: usize,
    /// `now - not_downloaded_for`: entries last used before this expire.
    pub cutoff: Timestamp,
}

/// Selects the entries not downloaded for `not_downloaded_for`.
pub fn select_expired(
    entries: &[CacheEntryInfo],
    not_downloaded_for: Duration,
    now: Timestamp,
) -> CacheSelection<'_> {
    // A cutoff before the representable past means nothing is old enough.
    let cutoff = now
        .saturating_sub(not_downloaded_for)
        .unwrap_or(Timestamp::MIN);
    let mut expired: Vec<&CacheEntryInfo> = entries
        .iter()
        .filter(|entry| entry.last_used() < cutoff)
        .collect();
    expired.sort_by(|a, b| {
        a.last_used()
            .cmp(&b.last_used())
            .then_with(|| a.id.cmp(&b.id))
    });
    CacheSelection {
        evaluated: entries.len(),
        kept: entries.len() - expired.len(),
        expired,
        cutoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn now() -> Timestamp {
        "2026-06-15T12:00:00Z".parse().unwrap()
    }

    fn days_ago(days: i64) -> Timestamp {
        now()
            .checked_sub(SignedDuration::from_hours(24 * days))
            .unwrap()
    }

    fn entry(id: &str, downloaded_days_ago: Option<i64>, created_days_ago: i64) -> CacheEntryInfo {
        CacheEntryInfo {
            id: id.to_owned(),
            relative_path: format!("library/{id}/manifests/latest"),
            downloaded_at: downloaded_days_ago.map(days_ago),
            created_at: days_ago(created_days_ago),
        }
    }

    fn expired_ids(selection: &CacheSelection<'_>) -> Vec<String> {
        selection
            .expired
            .iter()
            .map(|entry| entry.id.clone())
            .collect()
    }

    #[test]
    fn expires_entries_not_downloaded_for_the_duration() {
        let entries = vec![
            entry("fresh-download", Some(2), 100),
            entry("stale-download", Some(45), 100),
            entry("never-downloaded-old", None, 40),
            entry("never-downloaded-new", None, 3),
            entry("recached", Some(90), 5),
            entry("very-stale", Some(300), 400),
        ];
        let thirty_days = crate::cleanup::parse_duration("30d").unwrap();
        let selection = select_expired(&entries, thirty_days, now());
        assert_eq!(
            expired_ids(&selection),
            ["very-stale", "stale-download", "never-downloaded-old"]
        );
        assert_eq!((selection.evaluated, selection.kept), (6, 3));
        assert_eq!(selection.cutoff, days_ago(30));
    }

    #[test]
    fn boundary_future_and_huge_durations() {
        let exactly = entry("exactly-30-days", Some(30), 60);
        let future = CacheEntryInfo {
            downloaded_at: Some(now().checked_add(SignedDuration::from_hours(48)).unwrap()),
            ..entry("future", None, 400)
        };
        let entries = vec![exactly, future];
        let selection = select_expired(&entries, Duration::from_secs(30 * 86_400), now());
        assert!(
            selection.expired.is_empty(),
            "{:?}",
            expired_ids(&selection)
        );
        let forever = select_expired(&entries, Duration::from_secs(u64::MAX / 4), now());
        assert!(forever.expired.is_empty());
    }
}
