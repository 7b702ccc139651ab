//! Group-level listings shared by the reconciles of one group.
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
//! - our own writes: an object we wrote to is never served from a listing whose call was
//!   sent before that write ended, so a reconcile never acts on data older than its own change.
//!
//! An object that is not in the listing is not served either: the caller GETs it, so a
//! deleted upstream is still seen as GitLab's 404.
//!
//! The same listings serve the adoption lookup before a create, when at most
//! [`ADOPTION_MAX_AGE`] old and sent after our last write in the group: the Upstreams (or
//! VirtualRegistries) of a new group share one list call, and the create that follows a first
//! reconcile (which only waited for a registry) needs no second one. Registries use listings
//! for that lookup only: the group's registry list carries no associations, so it cannot stand
//! in for reading a registry.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;

use super::lock;
use crate::gitlab::{self, GitLabClient, PathOrId, Upstream, VirtualRegistry};

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

/// An object GitLab lists per group.
pub trait Listed: Clone + Send + Sync + 'static {
    fn id(&self) -> i64;

    /// Every object of the group, all pages.
    fn list_group(
        client: &GitLabClient,
        group: &PathOrId,
    ) -> impl Future<Output = gitlab::Result<Vec<Self>>> + Send;
}

impl Listed for Upstream {
    fn id(&self) -> i64 {
        self.id
    }

    fn list_group(
        client: &GitLabClient,
        group: &PathOrId,
    ) -> impl Future<Output = gitlab::Result<Vec<Self>>> + Send {
        client.list_group_upstreams_all(group, None)
    }
}

impl Listed for VirtualRegistry {
    fn id(&self) -> i64 {
        self.id
    }

    fn list_group(
        client: &GitLabClient,
        group: &PathOrId,
    ) -> impl Future<Output = gitlab::Result<Vec<Self>>> + Send {
        client.list_registries(group)
    }
}

/// The cache of the group upstream lists, one per process (the controller keeps it in its
/// `Context`).
pub type UpstreamListings = GroupListings<Upstream>;

/// The cache of the group registry lists, for adoption lookups only; kept in the
/// [`RegistryViews`](super::registry::RegistryViews).
pub type RegistryListings = GroupListings<VirtualRegistry>;

/// The listings of one kind of object.
pub struct GroupListings<T> {
    max_age: Duration,
    /// Orders our writes and list calls: a listing serves an object only when the last
    /// write to it ended before the listing's call was sent.
    sequence: AtomicU64,
    groups: Mutex<HashMap<ListingKey, Arc<GroupListing<T>>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ListingKey {
    connection: String,
    group: PathOrId,
}

struct GroupListing<T> {
    /// Held across a list call, so one call serves every reconcile waiting for it.
    state: tokio::sync::Mutex<ListingState<T>>,
    /// List calls finished, successful or not: read before waiting for `state`, it tells a
    /// waiter whether the call it waited for was someone else's.
    calls_finished: AtomicU64,
    /// Object id → sequence number of our last write to it.
    written: Mutex<HashMap<i64, u64>>,
    /// Sequence number of our last write to any object of the group, including writes whose
    /// object id is unknown (a create that failed).
    last_write: AtomicU64,
}

impl<T> Default for GroupListing<T> {
    fn default() -> Self {
        Self {
            state: tokio::sync::Mutex::new(ListingState {
                listing: None,
                last_call_failure: None,
            }),
            calls_finished: AtomicU64::new(0),
            written: Mutex::new(HashMap::new()),
            last_write: AtomicU64::new(0),
        }
    }
}

struct ListingState<T> {
    listing: Option<Listing<T>>,
    /// Why the last list call failed, when it did: reconciles that waited for it share it.
    last_call_failure: Option<gitlab::Error>,
}

struct Listing<T> {
    fetched_at: Timestamp,
    /// Sequence number taken just before the list call was sent.
    sent_at_sequence: u64,
    objects: HashMap<i64, ListedObject<T>>,
}

struct ListedObject<T> {
    object: T,
    /// The listing's `sent_at_sequence`, or for an object GitLab returned from a write of
    /// ours, that write's sequence number: the object is served while no later write of
    /// ours touched it.
    as_of_sequence: u64,
}

impl<T: Listed> GroupListings<T> {
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

    /// Object `id` as listed in `group` by a listing at most `max_age` old at `now`, listing
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
    ) -> Option<T> {
        self.with_listing(
            client,
            connection,
            group,
            now,
            Use::Drift,
            |listing, written| {
                let listed = listing.objects.get(&id)?;
                let written_since = written
                    .get(&id)
                    .is_some_and(|written| *written > listed.as_of_sequence);
                (!written_since).then(|| listed.object.clone())
            },
        )
        .await
        .ok()
        .flatten()
    }

    /// The group's objects that `matches`, for the adoption lookup before a create, from a
    /// listing at most [`ADOPTION_MAX_AGE`] old that was sent after every write of ours in
    /// the group (a create of ours may be missing from an older one), listing the group
    /// when no such listing is held. The error of the list call, when it failed (this
    /// reconcile's or the one it waited for): GitLab's answer, as a list of the caller's own
    /// would have had it, without a second request. Objects that appear in GitLab later are
    /// still caught at the create, where GitLab refuses a second upstream with the same url
    /// and credentials, or a second registry with the same name.
    pub async fn adoptable(
        &self,
        client: &GitLabClient,
        connection: &str,
        group: &PathOrId,
        now: Timestamp,
        matches: impl Fn(&T) -> bool,
    ) -> gitlab::Result<Vec<T>> {
        self.with_listing(
            client,
            connection,
            group,
            now,
            Use::Adoption,
            |listing, _| {
                Some(
                    listing
                        .objects
                        .values()
                        .map(|listed| &listed.object)
                        .filter(|object| matches(object))
                        .cloned()
                        .collect(),
                )
            },
        )
        .await
        .map(Option::unwrap_or_default)
    }

    /// Runs `read` on the group's listing, fetched first when the one held is not usable for
    /// `purpose`. The error of the list call this reconcile waited for (its own or another's),
    /// when it failed.
    async fn with_listing<R>(
        &self,
        client: &GitLabClient,
        connection: &str,
        group: &PathOrId,
        now: Timestamp,
        purpose: Use,
        read: impl FnOnce(&Listing<T>, &HashMap<i64, u64>) -> Option<R>,
    ) -> gitlab::Result<Option<R>> {
        let entry = self.entry(connection, group);
        let calls_before = entry.calls_finished.load(Ordering::Acquire);
        let mut state = entry.state.lock().await;
        let usable = state.listing.as_ref().is_some_and(|listing| match purpose {
            Use::Drift => self.is_fresh(listing, now, self.max_age),
            Use::Adoption => {
                self.is_fresh(listing, now, self.max_age.min(ADOPTION_MAX_AGE))
                    && entry.last_write.load(Ordering::Acquire) < listing.sent_at_sequence
            }
        });
        if !usable {
            if let Some(failure) = state
                .last_call_failure
                .as_ref()
                .filter(|_| entry.calls_finished.load(Ordering::Acquire) != calls_before)
            {
                // The call this reconcile waited for failed: not a second list.
                return Err(failure.clone());
            }
            let sent_at_sequence = self.next_sequence();
            let result = T::list_group(client, group).await;
            entry.calls_finished.fetch_add(1, Ordering::AcqRel);
            match result {
                Ok(objects) => {
                    lock(&entry.written).retain(|_, written| *written > sent_at_sequence);
                    state.listing = Some(Listing {
                        fetched_at: now,
                        sent_at_sequence,
                        objects: objects
                            .into_iter()
                            .map(|object| {
                                let listed = ListedObject {
                                    object,
                                    as_of_sequence: sent_at_sequence,
                                };
                                (listed.object.id(), listed)
                            })
                            .collect(),
                    });
                    state.last_call_failure = None;
                }
                Err(error) => {
                    tracing::debug!(
                        group = %group,
                        reason = error.reason(),
                        "group list failed"
                    );
                    state.listing = None;
                    state.last_call_failure = Some(error.clone());
                    return Err(error);
                }
            }
        }
        let Some(listing) = state.listing.as_ref() else {
            return Ok(None);
        };
        let written = lock(&entry.written);
        Ok(read(listing, &written))
    }

    /// Records that we wrote to (created, changed, deleted) object `id` of `group`, or to an
    /// object whose id we do not know (`None`: a create that failed, maybe after GitLab
    /// carried it out): no listing sent before now serves that object, or any adoption
    /// lookup, again. Call it once the write has ended, failed or not.
    pub fn record_write(&self, connection: &str, group: &PathOrId, id: Option<i64>) {
        self.record_write_in(&self.entry(connection, group), id);
    }

    /// The write's sequence number.
    fn record_write_in(&self, entry: &GroupListing<T>, id: Option<i64>) -> u64 {
        let sequence = self.next_sequence();
        if let Some(id) = id {
            lock(&entry.written).insert(id, sequence);
        }
        entry.last_write.fetch_max(sequence, Ordering::AcqRel);
        sequence
    }

    /// Records a write of ours that GitLab answered with the whole object (a create): as
    /// [`record_write`](Self::record_write), and the held listing of the group, if any,
    /// serves the object as answered until the listing expires. A listing being fetched
    /// meanwhile is left alone: it was sent before this write, so it does not serve the
    /// object.
    pub fn record_write_result(&self, connection: &str, group: &PathOrId, object: T) {
        let id = object.id();
        let entry = self.entry(connection, group);
        let as_of_sequence = self.record_write_in(&entry, Some(id));
        let Ok(mut state) = entry.state.try_lock() else {
            return;
        };
        if let Some(listing) = state.listing.as_mut() {
            listing.objects.insert(
                id,
                ListedObject {
                    object,
                    as_of_sequence,
                },
            );
        }
    }

    fn entry(&self, connection: &str, group: &PathOrId) -> Arc<GroupListing<T>> {
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
    fn is_fresh(&self, listing: &Listing<T>, now: Timestamp, max_age: Duration) -> bool {
        let age = now.duration_since(listing.fetched_at);
        !age.is_negative() && age.unsigned_abs() < max_age
    }
}
