//! Group-level upstream listings shared by the Upstream reconciles of one resync wave.
//!
//! At rest an Upstream is reconciled once per resync only to see whether GitLab drifted, and
//! one `GET /groups/:id/-/virtual_registries/container/upstreams` (all pages) carries every
//! field that check compares (name, url, description, cache validity, username). This cache
//! serves one such listing per (GitLab connection, group) to every reconcile of that group
//! within `max_age`, in place of one `GET /upstreams/:id` each. It owns:
//! - freshness, judged on the reconcile's own `now` (so virtual time works the same);
//! - single flight: concurrent reconciles of one group wait for one list call, and when that
//!   call fails they do not list again, each falls back to its own GET (a failure is never
//!   kept: the next reconcile to come lists again);
//! - our own writes: an upstream we wrote to is never served from a listing whose call was
//!   sent before that write ended, so a reconcile never acts on data older than its own change.
//!
//! An upstream that is not in the listing is not served either: the caller GETs it, so a
//! deleted upstream is still seen as GitLab's 404.
//!
//! The same listings serve the adoption lookup before a create (name and url), when at most
//! [`ADOPTION_MAX_AGE`] old and sent after our last write in the group: the Upstreams of a
//! new group share one list call, and the create that follows a first reconcile (which only
//! waited for a registry) needs no second one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use std::time::Duration;

use jiff::Timestamp;

use crate::gitlab::{GitLabClient, PathOrId, Upstream};

/// How old a listing the adoption lookup before a create may use. Short: an upstream
/// created by hand with our name and url, but other credentials, is adopted only if listed.
pub const ADOPTION_MAX_AGE: Duration = Duration::from_secs(30);

/// What a listing is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// The drift check of a known upstream.
    Drift,
    /// The adoption lookup before a create.
    Adoption,
}

/// The cache, one per process (the controller keeps it in its `Context`).
pub struct UpstreamListings {
    max_age: Duration,
    /// Orders our writes and list calls: a listing serves an upstream only when the last
    /// write to it ended before the listing's call was sent.
    sequence: AtomicU64,
    groups: Mutex<HashMap<ListingKey, Arc<GroupListing>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ListingKey {
    connection: String,
    group: PathOrId,
}

#[derive(Default)]
struct GroupListing {
    /// Held across a list call, so one call serves every reconcile waiting for it.
    state: tokio::sync::Mutex<ListingState>,
    /// List calls finished, successful or not: read before waiting for `state`, it tells a
    /// waiter whether the call it waited for was someone else's.
    calls_finished: AtomicU64,
    /// Upstream id → sequence number of our last write to it.
    written: Mutex<HashMap<i64, u64>>,
}

#[derive(Default)]
struct ListingState {
    listing: Option<Listing>,
    last_call_failed: bool,
}

struct Listing {
    fetched_at: Timestamp,
    /// Sequence number taken just before the list call was sent.
    sent_at_sequence: u64,
    upstreams: HashMap<i64, Upstream>,
}

impl UpstreamListings {
    /// A listing older than `max_age` is fetched again. The controller uses half its resync,
    /// so one listing serves a group's whole resync wave and drift is still seen at the next.
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            sequence: AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Upstream `id` as listed in `group` by a listing at most `max_age` old at `now`, listing
    /// the group when no such listing is held. `None` when the caller must GET it itself: the
    /// id is not listed, we wrote to it since the listing was sent, or the list call failed.
    ///
    /// `connection` names the GitLab url and token source `client` stands for: listings are
    /// never shared between connections.
    pub async fn listed(
        &self,
        client: &GitLabClient,
        connection: &str,
        group: &PathOrId,
        id: i64,
        now: Timestamp,
    ) -> Option<Upstream> {
        self.with_listing(
            client,
            connection,
            group,
            now,
            Use::Drift,
            |listing, written| {
                let written_since = written
                    .get(&id)
                    .is_some_and(|written| *written > listing.sent_at_sequence);
                if written_since {
                    return None;
                }
                listing.upstreams.get(&id).cloned()
            },
        )
        .await
    }

    /// The group's upstreams that `matches`, for the adoption lookup before a create, from a
    /// listing at most [`ADOPTION_MAX_AGE`] old that was sent after every write of ours in
    /// the group (a create of ours may be missing from an older one), listing the group
    /// when no such listing is held. `None` when the list call failed: the caller lists
    /// itself. Upstreams that appear in GitLab later are still caught at the create, where
    /// GitLab refuses a second upstream with the same url and credentials.
    pub async fn adoptable(
        &self,
        client: &GitLabClient,
        connection: &str,
        group: &PathOrId,
        now: Timestamp,
        matches: impl Fn(&Upstream) -> bool,
    ) -> Option<Vec<Upstream>> {
        self.with_listing(
            client,
            connection,
            group,
            now,
            Use::Adoption,
            |listing, _| {
                Some(
                    listing
                        .upstreams
                        .values()
                        .filter(|upstream| matches(upstream))
                        .cloned()
                        .collect(),
                )
            },
        )
        .await
    }

    /// Runs `read` on the group's listing, fetched first when the one held is not usable for
    /// `purpose`. `None` when the list call this reconcile waited for (its own or another's)
    /// failed.
    async fn with_listing<R>(
        &self,
        client: &GitLabClient,
        connection: &str,
        group: &PathOrId,
        now: Timestamp,
        purpose: Use,
        read: impl FnOnce(&Listing, &HashMap<i64, u64>) -> Option<R>,
    ) -> Option<R> {
        let entry = self.entry(connection, group);
        let calls_before = entry.calls_finished.load(Ordering::Acquire);
        let mut state = entry.state.lock().await;
        let usable = state.listing.as_ref().is_some_and(|listing| match purpose {
            Use::Drift => self.is_fresh(listing, now, self.max_age),
            Use::Adoption => {
                self.is_fresh(listing, now, self.max_age.min(ADOPTION_MAX_AGE))
                    && !lock(&entry.written)
                        .values()
                        .any(|written| *written > listing.sent_at_sequence)
            }
        });
        if !usable {
            if state.last_call_failed
                && entry.calls_finished.load(Ordering::Acquire) != calls_before
            {
                // The call this reconcile waited for failed: its own reads, not a second list.
                return None;
            }
            let sent_at_sequence = self.next_sequence();
            let result = client.list_group_upstreams_all(group, None).await;
            entry.calls_finished.fetch_add(1, Ordering::AcqRel);
            match result {
                Ok(upstreams) => {
                    lock(&entry.written).retain(|_, written| *written > sent_at_sequence);
                    state.listing = Some(Listing {
                        fetched_at: now,
                        sent_at_sequence,
                        upstreams: upstreams
                            .into_iter()
                            .map(|upstream| (upstream.id, upstream))
                            .collect(),
                    });
                    state.last_call_failed = false;
                }
                Err(error) => {
                    tracing::debug!(
                        group = %group,
                        reason = error.reason(),
                        "group upstream list failed; reading upstreams one by one"
                    );
                    state.listing = None;
                    state.last_call_failed = true;
                    return None;
                }
            }
        }
        let listing = state.listing.as_ref()?;
        let written = lock(&entry.written);
        read(listing, &written)
    }

    /// Records that we wrote to (created, changed, deleted) upstream `id`: no listing sent
    /// before now serves it again. Call it once the write has ended, failed or not.
    pub fn record_write(&self, connection: &str, group: &PathOrId, id: i64) {
        let sequence = self.next_sequence();
        lock(&self.entry(connection, group).written).insert(id, sequence);
    }

    fn entry(&self, connection: &str, group: &PathOrId) -> Arc<GroupListing> {
        let key = ListingKey {
            connection: connection.to_owned(),
            group: group.clone(),
        };
        lock(&self.groups).entry(key).or_default().clone()
    }

    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A clock that went backwards makes a listing stale rather than fresh for longer.
    fn is_fresh(&self, listing: &Listing, now: Timestamp, max_age: Duration) -> bool {
        let age = now.duration_since(listing.fetched_at);
        !age.is_negative() && age.unsigned_abs() < max_age
    }
}
