//! The VirtualRegistry engine: makes one GitLab container virtual registry, and the order of
//! its upstreams, match the declared spec.
//!
//! The spec's list is authoritative: missing associations are created, extras removed, and
//! positions corrected with the fewest repositioning calls (only upstreams outside the longest
//! run already in order are moved). While an upstream of the list is not yet resolved to a
//! GitLab id, nothing is removed: the unknown association may be that upstream's; while one
//! is being created, members are only appended, in declared order, and moved once all have
//! their ids.

use crate::crd::reasons::Reason;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::OwnedMutexGuard;

use super::listing::RegistryListings;
use super::{Action, Error, FieldChange, Mode, Result, failure_condition, lock};
use crate::crd::conditions::{ConditionUpdate, SYNCED, Status, UPSTREAMS_RESOLVED};
use crate::gitlab::{GitLabClient, PathOrId, RegistryUpdate, VirtualRegistry};

/// GitLab's limit of upstreams per registry.
pub const MAX_UPSTREAMS: usize = 5;

/// One upstream of the declared list, as far as it could be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredMember {
    /// Name of the `Upstream` object.
    pub name: String,
    pub resolution: Resolution,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The upstream exists in GitLab with this id.
    Resolved(i64),
    /// The object exists but has no GitLab id yet, and is on its way to one (it is created
    /// through a registry). Later members wait for it, so that the declared order is built by
    /// appending, without repositioning calls.
    Pending,
    /// The object exists but has no GitLab id and is not getting one until something changes
    /// (its last reconcile failed, or it is suspended): later members do not wait for it.
    Blocked,
    /// No such object.
    Missing,
}

/// The registry as declared, its members resolved.
#[derive(Debug, Clone)]
pub struct DesiredRegistry {
    pub group: PathOrId,
    pub name: String,
    /// `None`: GitLab's description is left as it is.
    pub description: Option<String>,
    pub members: Vec<DesiredMember>,
}

/// What the last status knew.
#[derive(Debug, Clone, Default)]
pub struct KnownRegistry {
    pub registry_id: Option<i64>,
    pub last_handled_purge_cache: Option<String>,
    /// The last reconcile left the registry waiting for Upstreams to get their ids, and
    /// nothing else changed since: this reconcile follows an Upstream's new id, and may plan
    /// on this process's recent view of the registry ([`RegistryViews`]).
    pub waiting_for_upstreams: bool,
}

#[derive(Debug, Clone)]
pub struct RegistryRequest {
    pub desired: DesiredRegistry,
    pub known: KnownRegistry,
    pub purge_cache_request: Option<String>,
    pub mode: Mode,
}

/// One association as GitLab holds it after the reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    pub upstream_id: i64,
    /// `None` only in plan mode, for an association that would be created.
    pub association_id: Option<i64>,
    pub position: i64,
}

#[derive(Debug, Clone)]
pub struct RegistryOutcome {
    pub registry_id: Option<i64>,
    pub group_id: Option<i64>,
    pub pull_prefix: Option<String>,
    pub members: Vec<MemberStatus>,
    pub last_handled_purge_cache: Option<String>,
    pub synced: ConditionUpdate,
    pub upstreams_resolved: ConditionUpdate,
    pub actions: Vec<Action>,
    pub error: Option<Error>,
    /// The registry's own fields as GitLab holds them after this reconcile (associations
    /// are in `members`); `None` until it was read or created.
    pub seen: Option<VirtualRegistry>,
}

/// How long what this process saw of a registry (read, then changed by its own calls) stands
/// in for a fresh read. Long enough for the reruns that follow Upstreams getting their ids
/// one after the other; far shorter than the resync, so drift is still read at every resync.
pub const REGISTRY_VIEW_MAX_AGE: Duration = Duration::from_secs(30);

/// What this process knows and does per registry, shared by the registry and Upstream
/// engines:
/// - its last view of each registry, with its own changes applied: a reconcile shortly after
///   another plans on it instead of reading the registry again. A call GitLab refuses because
///   the view was out of date (an upstream created through the registry since, an association
///   removed in the UI) makes the reconcile read the registry and plan again;
/// - one insert at a time into each registry: GitLab gives every new association (an upstream
///   created through the registry, or associated with it) the highest position + 1, so two
///   inserts at once race for one position. A registry's reconcile holds its registry from
///   the read to the last write, an upstream create through it holds it for the POST;
/// - the group registry lists for the adoption lookup before a create
///   ([`RegistryListings`]): the registries of a new group share one list call.
pub struct RegistryViews {
    max_age: Duration,
    views: Mutex<HashMap<(String, i64), (Timestamp, VirtualRegistry)>>,
    inserts: Mutex<HashMap<(String, i64), InsertLock>>,
    listings: RegistryListings,
}

/// Held while inserting into one registry.
type InsertLock = Arc<tokio::sync::Mutex<()>>;

impl RegistryViews {
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            views: Mutex::new(HashMap::new()),
            inserts: Mutex::new(HashMap::new()),
            listings: RegistryListings::new(max_age),
        }
    }

    /// Records a write of ours to registry `id` of `group` (create, rename, delete; `None`
    /// when a create failed, maybe after GitLab carried it out): no adoption lookup uses a
    /// group list sent before it.
    pub fn record_write(&self, connection: &str, group: &PathOrId, id: Option<i64>) {
        self.listings.record_write(connection, group, id);
    }

    /// Waits until nothing else of this process inserts into registry `id` of the GitLab at
    /// `gitlab_url`, and holds it until the guard is dropped. Keyed by the GitLab instance,
    /// not the token: GitLab's constraint is the same whoever inserts.
    pub async fn hold_inserts(&self, gitlab_url: &str, id: i64) -> OwnedMutexGuard<()> {
        let lock = lock(&self.inserts)
            .entry((gitlab_url.to_owned(), id))
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn get(&self, connection: &str, id: i64, now: Timestamp) -> Option<VirtualRegistry> {
        let views = lock(&self.views);
        let (seen_at, view) = views.get(&(connection.to_owned(), id))?;
        let age = now.duration_since(*seen_at);
        (!age.is_negative() && age.unsigned_abs() < self.max_age).then(|| view.clone())
    }

    fn store(&self, connection: &str, view: VirtualRegistry, now: Timestamp) {
        lock(&self.views).insert((connection.to_owned(), view.id), (now, view));
    }

    /// Adds an association GitLab reported creating (an upstream created through the
    /// registry) to the view of its registry, when it lands where the view expects the next
    /// one; otherwise the view is dropped and the next reconcile reads the registry.
    pub fn record_insert(&self, connection: &str, association: &crate::gitlab::RegistryUpstream) {
        let Some(id) = association.registry_id else {
            return;
        };
        let mut views = lock(&self.views);
        let key = (connection.to_owned(), id);
        let kept = match views.get_mut(&key) {
            Some((_, view))
                if association.position == view.registry_upstreams.len() as i64 + 1
                    && view
                        .registry_upstreams
                        .iter()
                        .all(|held| held.upstream_id != association.upstream_id) =>
            {
                view.registry_upstreams.push(association.clone());
                true
            }
            _ => false,
        };
        if !kept {
            views.remove(&key);
        }
    }

    /// Drops the view of registry `id`: its next reconcile reads it.
    pub fn forget(&self, connection: &str, id: i64) {
        lock(&self.views).remove(&(connection.to_owned(), id));
    }
}

/// A reconcile's access to the registry views.
#[derive(Clone, Copy)]
pub struct SharedViews<'a> {
    pub views: &'a RegistryViews,
    /// The GitLab url and token source the client stands for: views are never shared
    /// between connections.
    pub connection: &'a str,
    pub now: Timestamp,
}

/// Makes the GitLab registry match `request.desired`; a GitLab error ends the reconcile with
/// `Synced=False` and the error in `outcome.error`, keeping what was done before it.
pub async fn reconcile(client: &GitLabClient, request: &RegistryRequest) -> RegistryOutcome {
    reconcile_with_views(client, request, None).await
}

/// As [`reconcile`], planning on this process's recent view of the registry
/// ([`RegistryViews`]) instead of reading it, when there is one and the reconcile only
/// follows Upstreams getting their ids (`known.waiting_for_upstreams`); `plan` always
/// reads. Either way the view is kept up to date for the next reconcile.
pub async fn reconcile_with_views(
    client: &GitLabClient,
    request: &RegistryRequest,
    views: Option<SharedViews<'_>>,
) -> RegistryOutcome {
    let views = views.filter(|_| request.mode.writes());
    let mut outcome = RegistryOutcome {
        registry_id: request.known.registry_id,
        group_id: None,
        pull_prefix: None,
        members: Vec::new(),
        last_handled_purge_cache: request.known.last_handled_purge_cache.clone(),
        synced: ConditionUpdate::new(
            SYNCED,
            Status::True,
            Reason::Synced.as_str(),
            "in line with the spec",
        ),
        upstreams_resolved: resolution_condition(&request.desired.members),
        actions: Vec::new(),
        error: None,
        seen: None,
    };
    let held = match (views, request.known.registry_id) {
        (Some(shared), Some(id)) => Some(
            shared
                .views
                .hold_inserts(client.base_url().as_str(), id)
                .await,
        ),
        _ => None,
    };
    // Taken once no insert of ours is under way: an upstream created through the registry
    // meanwhile has dropped the view.
    let view = views.and_then(|shared| {
        let id = request
            .known
            .registry_id
            .filter(|_| request.known.waiting_for_upstreams)?;
        shared.views.get(shared.connection, id, shared.now)
    });
    let planned_on_view = view.is_some();
    let mut result = sync(client, request, views, view, &mut outcome).await;
    if planned_on_view && matches!(&result, Err(error) if refuses_a_stale_plan(error)) {
        // Planned on an out-of-date view: what was done stays in the outcome; read the
        // registry and plan again.
        result = sync(client, request, views, None, &mut outcome).await;
    }
    if let Some(shared) = views {
        match (&result, outcome.registry_id) {
            (Ok(()), Some(id)) => match view_after(&outcome, id) {
                Some(view) => shared.views.store(shared.connection, view, shared.now),
                None => shared.views.forget(shared.connection, id),
            },
            (_, Some(id)) => shared.views.forget(shared.connection, id),
            (_, None) => {}
        }
    }
    drop(held);
    if let Err(error) = result {
        outcome.synced = failure_condition(&error);
        outcome.error = Some(error);
    }
    if let Some(id) = outcome.registry_id {
        outcome.pull_prefix = Some(pull_prefix(&client.host_with_port(), id));
    }
    outcome
}

/// GitLab refusing a write planned on what we saw: an association that is already there or
/// gone, a position or limit that no longer holds.
fn refuses_a_stale_plan(error: &Error) -> bool {
    match error {
        Error::GitLab(error) => {
            error.is_not_found()
                || error.field_errors().is_some()
                || matches!(error, crate::gitlab::Error::LimitExceeded { .. })
        }
        Error::InvalidSpec(_) => false,
    }
}

/// The registry as GitLab holds it after a successful reconcile, from the outcome.
fn view_after(outcome: &RegistryOutcome, id: i64) -> Option<VirtualRegistry> {
    let seen = outcome.seen.clone()?;
    let registry_upstreams = outcome
        .members
        .iter()
        .map(|member| {
            Some(crate::gitlab::RegistryUpstream {
                id: member.association_id?,
                registry_id: Some(id),
                upstream_id: Some(member.upstream_id),
                position: member.position,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(VirtualRegistry {
        registry_upstreams,
        ..seen
    })
}

/// The image prefix users pull through: `<gitlab host>/virtual_registries/container/<id>`.
pub fn pull_prefix(gitlab_host: &str, registry_id: i64) -> String {
    format!("{gitlab_host}/virtual_registries/container/{registry_id}")
}

fn resolution_condition(members: &[DesiredMember]) -> ConditionUpdate {
    let missing: Vec<&str> = members
        .iter()
        .filter(|m| m.resolution == Resolution::Missing)
        .map(|m| m.name.as_str())
        .collect();
    let pending: Vec<&str> = members
        .iter()
        .filter(|m| matches!(m.resolution, Resolution::Pending | Resolution::Blocked))
        .map(|m| m.name.as_str())
        .collect();
    if !missing.is_empty() {
        ConditionUpdate::new(
            UPSTREAMS_RESOLVED,
            false,
            Reason::UpstreamNotFound.as_str(),
            format!("no Upstream named {} in this namespace", missing.join(", ")),
        )
    } else if !pending.is_empty() {
        ConditionUpdate::new(
            UPSTREAMS_RESOLVED,
            false,
            Reason::WaitingForUpstream.as_str(),
            format!("Upstream {} not created in GitLab yet", pending.join(", ")),
        )
    } else {
        ConditionUpdate::new(
            UPSTREAMS_RESOLVED,
            true,
            Reason::Resolved.as_str(),
            format!("{} upstream(s) resolved", members.len()),
        )
    }
}

/// One pass: read the registry (or take `view`, this process's recent view of it), then
/// create, update and associate what differs.
async fn sync(
    client: &GitLabClient,
    request: &RegistryRequest,
    shared: Option<SharedViews<'_>>,
    view: Option<VirtualRegistry>,
    outcome: &mut RegistryOutcome,
) -> Result<()> {
    let desired = &request.desired;
    let writes = request.mode.writes();
    let resolved_count = desired
        .members
        .iter()
        .filter(|m| !matches!(m.resolution, Resolution::Missing))
        .count();
    if resolved_count > MAX_UPSTREAMS {
        return Err(Error::InvalidSpec(format!(
            "{resolved_count} upstreams listed; GitLab allows at most {MAX_UPSTREAMS} per registry"
        )));
    }

    let found = match view {
        Some(view) => Some(view),
        None => find_remote(client, request, shared, outcome).await?,
    };
    let remote = match found {
        Some(remote) => remote,
        None => {
            let mut changes = vec![FieldChange::new(
                "name",
                None::<String>,
                Some(&desired.name),
            )];
            if let Some(description) = &desired.description {
                changes.push(FieldChange::new(
                    "description",
                    None::<String>,
                    Some(description),
                ));
            }
            if !writes {
                outcome.actions.push(
                    Action::new(
                        Reason::Created.as_str(),
                        format!("would create registry {}", desired.name),
                    )
                    .with_changes(changes),
                );
                let planned = plan_associations(&[], &desired.members);
                record_association_actions(outcome, &planned, &desired.members);
                return Ok(());
            }
            let created = client
                .create_registry(
                    &desired.group,
                    &desired.name,
                    desired.description.as_deref(),
                )
                .await;
            if let Some(shared) = shared {
                let id = created.as_ref().ok().map(|created| created.id);
                shared
                    .views
                    .record_write(shared.connection, &desired.group, id);
            }
            match created {
                Ok(created) => {
                    outcome.registry_id = Some(created.id);
                    outcome.actions.push(
                        Action::new(
                            Reason::Created.as_str(),
                            format!("created registry {}", created.id),
                        )
                        .with_changes(changes),
                    );
                    created
                }
                // Another writer (a second operator instance, someone in the UI) created it
                // since the lookup: it is there to adopt, the spec is fine.
                Err(error) if error.is_already_taken("name") => {
                    adopt_by_name(client, request, None, outcome)
                        .await?
                        .ok_or(Error::GitLab(error))?
                }
                Err(error) => return Err(error.into()),
            }
        }
    };
    outcome.registry_id = Some(remote.id);
    outcome.group_id = Some(remote.group_id);

    let mut update = RegistryUpdate::default();
    let mut changes = Vec::new();
    if remote.name != desired.name {
        changes.push(FieldChange::new(
            "name",
            Some(&remote.name),
            Some(&desired.name),
        ));
        update.name = Some(desired.name.clone());
    }
    if let Some(description) = &desired.description {
        let current = remote.description.as_deref().unwrap_or_default();
        if current != description && description.trim().is_empty() {
            // `PATCH /registries/:id` declares `description` with `allow_blank: false`: GitLab
            // answers `400 {"error":"description is empty"}`, so a description cannot be
            // cleared through the API.
            outcome.actions.push(
                Action::new(
                    Reason::DescriptionKept.as_str(),
                    format!(
                        "GitLab refuses a blank description: registry {} keeps {current:?}",
                        remote.id
                    ),
                )
                .read_only(),
            );
        } else if current != description {
            changes.push(FieldChange::new(
                "description",
                Some(current),
                Some(description),
            ));
            update.description = Some(description.clone());
        }
    }
    if update != RegistryUpdate::default() {
        if writes {
            let updated = client.update_registry(remote.id, &update).await;
            if let Some(shared) = shared.filter(|_| update.name.is_some()) {
                shared
                    .views
                    .record_write(shared.connection, &desired.group, Some(remote.id));
            }
            updated?;
        }
        outcome.actions.push(
            Action::new(
                Reason::Updated.as_str(),
                format!("updated registry {}", remote.id),
            )
            .with_changes(changes),
        );
    }
    outcome.seen = Some(VirtualRegistry {
        name: update.name.clone().unwrap_or_else(|| remote.name.clone()),
        description: update
            .description
            .clone()
            .or_else(|| remote.description.clone()),
        registry_upstreams: Vec::new(),
        ..remote.clone()
    });

    let current: Vec<CurrentAssociation> = {
        let mut associations: Vec<_> = remote
            .registry_upstreams
            .iter()
            .filter_map(|a| {
                a.upstream_id.map(|upstream_id| CurrentAssociation {
                    association_id: Some(a.id),
                    upstream_id,
                    position: a.position,
                })
            })
            .collect();
        associations.sort_by_key(|a| a.position);
        associations
    };
    let planned = plan_associations(&current, &desired.members);
    record_association_actions(outcome, &planned, &desired.members);
    let mut list = planned.final_order.clone();
    if writes {
        for association_id in planned.removals.iter().filter_map(|r| r.association_id) {
            delete_association_tolerating_gone(client, association_id).await?;
        }
        for addition in &planned.additions {
            let created = client.associate_upstream(remote.id, *addition).await?;
            if let Some(entry) = list.iter_mut().find(|e| e.upstream_id == *addition) {
                entry.association_id = Some(created.id);
            }
        }
        for movement in &planned.moves {
            let association_id = list
                .iter()
                .find(|e| e.upstream_id == movement.upstream_id)
                .and_then(|e| e.association_id);
            if let Some(association_id) = association_id {
                client
                    .reposition_association(association_id, movement.position)
                    .await?;
            }
        }
    }
    outcome.members = list
        .iter_mut()
        .enumerate()
        .map(|(index, entry)| MemberStatus {
            name: member_name(&desired.members, entry.upstream_id),
            upstream_id: entry.upstream_id,
            association_id: entry.association_id,
            position: index as i64 + 1,
        })
        .collect();
    purge_cache_if_requested(client, request, outcome, remote.id).await
}

fn member_name(members: &[DesiredMember], upstream_id: i64) -> String {
    members
        .iter()
        .find(|m| m.resolution == Resolution::Resolved(upstream_id))
        .map(|m| m.name.clone())
        .unwrap_or_else(|| format!("(not declared) upstream {upstream_id}"))
}

fn record_association_actions(
    outcome: &mut RegistryOutcome,
    planned: &AssociationPlan,
    members: &[DesiredMember],
) {
    for removal in &planned.removals {
        outcome.actions.push(
            Action::new(
                Reason::Disassociated.as_str(),
                format!("removed upstream {} (not in the spec)", removal.upstream_id),
            )
            .with_changes(vec![FieldChange::new(
                "upstreams",
                Some(removal.upstream_id),
                None::<String>,
            )]),
        );
    }
    for addition in &planned.additions {
        outcome.actions.push(
            Action::new(
                Reason::Associated.as_str(),
                format!("added upstream {}", member_name(members, *addition)),
            )
            .with_changes(vec![FieldChange::new(
                "upstreams",
                None::<String>,
                Some(addition),
            )]),
        );
    }
    for movement in &planned.moves {
        outcome.actions.push(
            Action::new(
                Reason::Repositioned.as_str(),
                format!(
                    "moved upstream {} to position {}",
                    member_name(members, movement.upstream_id),
                    movement.position
                ),
            )
            .with_changes(vec![FieldChange::new(
                "position",
                None::<String>,
                Some(movement.position),
            )]),
        );
    }
}

async fn find_remote(
    client: &GitLabClient,
    request: &RegistryRequest,
    shared: Option<SharedViews<'_>>,
    outcome: &mut RegistryOutcome,
) -> Result<Option<VirtualRegistry>> {
    if let Some(id) = request.known.registry_id {
        match client.get_registry(id).await {
            Ok(remote) => return Ok(Some(remote)),
            Err(error) if error.is_not_found() => {
                outcome.registry_id = None;
                outcome.actions.push(
                    Action::new(
                        Reason::NotFound.as_str(),
                        format!("registry {id} is gone from GitLab"),
                    )
                    .read_only(),
                );
            }
            Err(error) => return Err(error.into()),
        }
    }
    adopt_by_name(client, request, shared, outcome).await
}

/// The group's registry with the declared name, if any. Registry names are unique in a
/// group: the one with our name is ours to adopt. With `shared`, the group list may be one
/// that other reconciles of the group share ([`RegistryListings`]); a registry it shows but
/// GitLab no longer has (deleted since) is looked up again in a list of our own.
async fn adopt_by_name(
    client: &GitLabClient,
    request: &RegistryRequest,
    shared: Option<SharedViews<'_>>,
    outcome: &mut RegistryOutcome,
) -> Result<Option<VirtualRegistry>> {
    let desired = &request.desired;
    let named = |registry: &VirtualRegistry| registry.name == desired.name;
    if let Some(shared) = shared {
        let listed = shared
            .views
            .listings
            .adoptable(client, shared.connection, &desired.group, shared.now, named)
            .await?;
        let Some(found) = listed.into_iter().next() else {
            return Ok(None);
        };
        // The group list carries no associations; the registry itself does.
        match client.get_registry(found.id).await {
            Ok(remote) => return Ok(Some(adopted(outcome, remote))),
            // Listed, then deleted: a list of our own below tells what the group holds now.
            Err(error) if error.is_not_found() => {
                shared
                    .views
                    .record_write(shared.connection, &desired.group, Some(found.id));
            }
            Err(error) => return Err(error.into()),
        }
    }
    let listed = client.list_registries(&desired.group).await?;
    let Some(found) = listed.into_iter().find(named) else {
        return Ok(None);
    };
    let remote = client.get_registry(found.id).await?;
    Ok(Some(adopted(outcome, remote)))
}

fn adopted(outcome: &mut RegistryOutcome, remote: VirtualRegistry) -> VirtualRegistry {
    outcome.actions.push(
        Action::new(
            Reason::Adopted.as_str(),
            format!("adopted existing registry {} ({})", remote.id, remote.name),
        )
        .read_only(),
    );
    remote
}

async fn delete_association_tolerating_gone(
    client: &GitLabClient,
    association_id: i64,
) -> Result<()> {
    match client.delete_association(association_id).await {
        Err(error) if !error.is_not_found() => Err(error.into()),
        _ => Ok(()),
    }
}

async fn purge_cache_if_requested(
    client: &GitLabClient,
    request: &RegistryRequest,
    outcome: &mut RegistryOutcome,
    registry_id: i64,
) -> Result<()> {
    let action = super::purge_once(
        request.purge_cache_request.as_ref(),
        &mut outcome.last_handled_purge_cache,
        request.mode,
        format!("registry {registry_id}"),
        || client.purge_registry_cache(registry_id),
    )
    .await?;
    outcome.actions.extend(action);
    Ok(())
}

/// Deletes the registry. Upstreams in `keep_upstream_ids` (their `Upstream` objects still
/// exist) are disassociated first, so GitLab's cascade does not delete them with it. A
/// registry already gone counts as deleted.
pub async fn delete(
    client: &GitLabClient,
    registry_id: i64,
    keep_upstream_ids: &HashSet<i64>,
    mode: Mode,
) -> Result<Vec<Action>> {
    let remote = match client.get_registry(registry_id).await {
        Ok(remote) => remote,
        Err(error) if error.is_not_found() => {
            return Ok(vec![
                Action::new(
                    Reason::Deleted.as_str(),
                    format!("registry {registry_id} was already gone"),
                )
                .read_only(),
            ]);
        }
        Err(error) => return Err(error.into()),
    };
    let mut actions = Vec::new();
    for association in &remote.registry_upstreams {
        let Some(upstream_id) = association.upstream_id else {
            continue;
        };
        if keep_upstream_ids.contains(&upstream_id) {
            if mode.writes() {
                delete_association_tolerating_gone(client, association.id).await?;
            }
            actions.push(Action::new(
                Reason::Disassociated.as_str(),
                format!("kept upstream {upstream_id}: its Upstream object still exists"),
            ));
        }
    }
    if mode.writes() {
        match client.delete_registry(registry_id).await {
            Err(error) if !error.is_not_found() => return Err(error.into()),
            _ => {}
        }
    }
    actions.push(Action::new(
        Reason::Deleted.as_str(),
        format!("deleted registry {registry_id}"),
    ));
    Ok(actions)
}

/// An association as GitLab lists it, in position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentAssociation {
    pub association_id: Option<i64>,
    pub upstream_id: i64,
    pub position: i64,
}

/// A repositioning call: move `upstream_id` to `position` (GitLab shifts those in between).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub upstream_id: i64,
    pub position: i64,
}

/// The calls that turn the current associations into the declared order, to be sent in this
/// order: removals, additions (GitLab appends them), then moves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AssociationPlan {
    pub removals: Vec<CurrentAssociation>,
    pub additions: Vec<i64>,
    pub moves: Vec<Move>,
    /// The associations after every call, in position order.
    pub final_order: Vec<CurrentAssociation>,
}

/// Plans the fewest calls that make GitLab's list equal the resolved members in declared
/// order. Pure: the rule is tested without GitLab.
pub fn plan_associations(
    current: &[CurrentAssociation],
    members: &[DesiredMember],
) -> AssociationPlan {
    let mut desired_ids: Vec<i64> = Vec::new();
    for member in members {
        if let Resolution::Resolved(id) = member.resolution
            && !desired_ids.contains(&id)
        {
            desired_ids.push(id);
        }
    }
    let all_resolved = members
        .iter()
        .all(|m| matches!(m.resolution, Resolution::Resolved(_)));

    let mut plan = AssociationPlan::default();
    let mut list: Vec<CurrentAssociation> = Vec::new();
    for association in current {
        if desired_ids.contains(&association.upstream_id) || !all_resolved {
            list.push(association.clone());
        } else {
            plan.removals.push(association.clone());
        }
    }
    // GitLab appends every new association: adding members in declared order, none past a
    // member still being created, builds the declared order without repositioning calls.
    let addable = members
        .iter()
        .take_while(|m| m.resolution != Resolution::Pending)
        .filter_map(|m| match m.resolution {
            Resolution::Resolved(id) => Some(id),
            _ => None,
        });
    for id in addable {
        if !list.iter().any(|a| a.upstream_id == id) {
            plan.additions.push(id);
            list.push(CurrentAssociation {
                association_id: None,
                upstream_id: id,
                position: 0,
            });
        }
    }
    // While a member is being created, only append: the order is put right in one pass once
    // every member has its id (an upstream created through this registry sits first until
    // then; moving it now would only be moved again).
    let being_created = members.iter().any(|m| m.resolution == Resolution::Pending);
    // Target: declared upstreams first, in order; undeclared ones kept (only while some are
    // unresolved) after them, in their current order.
    let target: Vec<i64> = desired_ids
        .iter()
        .copied()
        .filter(|id| list.iter().any(|a| a.upstream_id == *id))
        .chain(
            list.iter()
                .map(|a| a.upstream_id)
                .filter(|id| !desired_ids.contains(id)),
        )
        .collect();
    let target_index = |id: i64| target.iter().position(|t| *t == id).unwrap_or(usize::MAX);
    let in_order = longest_increasing_run(
        &list
            .iter()
            .map(|a| target_index(a.upstream_id))
            .collect::<Vec<_>>(),
    );
    let stay: HashSet<i64> = in_order.iter().map(|&i| list[i].upstream_id).collect();
    for (index, id) in target.iter().enumerate().filter(|_| !being_created) {
        if stay.contains(id) {
            continue;
        }
        let Some(from) = list.iter().position(|a| a.upstream_id == *id) else {
            continue;
        };
        let entry = list.remove(from);
        let to = if index == 0 {
            0
        } else {
            list.iter()
                .position(|a| a.upstream_id == target[index - 1])
                .map_or(0, |p| p + 1)
        };
        list.insert(to, entry);
        plan.moves.push(Move {
            upstream_id: *id,
            position: to as i64 + 1,
        });
    }
    for (index, entry) in list.iter_mut().enumerate() {
        entry.position = index as i64 + 1;
    }
    plan.final_order = list;
    plan
}

/// Indices of one longest strictly increasing subsequence of `values`.
fn longest_increasing_run(values: &[usize]) -> Vec<usize> {
    let n = values.len();
    let mut length = vec![1usize; n];
    let mut previous = vec![usize::MAX; n];
    for i in 0..n {
        for j in 0..i {
            if values[j] < values[i] && length[j] + 1 > length[i] {
                length[i] = length[j] + 1;
                previous[i] = j;
            }
        }
    }
    let Some(mut last) = (0..n).max_by_key(|&i| (length[i], std::cmp::Reverse(i))) else {
        return Vec::new();
    };
    let mut run = vec![last];
    while previous[last] != usize::MAX {
        last = previous[last];
        run.push(last);
    }
    run.reverse();
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(ids: &[i64]) -> Vec<CurrentAssociation> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| CurrentAssociation {
                association_id: Some(100 + id),
                upstream_id: *id,
                position: i as i64 + 1,
            })
            .collect()
    }

    fn members(ids: &[i64]) -> Vec<DesiredMember> {
        ids.iter()
            .map(|id| DesiredMember {
                name: format!("u{id}"),
                resolution: Resolution::Resolved(*id),
            })
            .collect()
    }

    /// Replays a plan with GitLab's documented semantics and returns the final order.
    fn replay(start: &[i64], plan: &AssociationPlan) -> Vec<i64> {
        let mut list: Vec<i64> = start.to_vec();
        for removal in &plan.removals {
            list.retain(|id| *id != removal.upstream_id);
        }
        list.extend(plan.additions.iter().copied());
        for movement in &plan.moves {
            let from = list
                .iter()
                .position(|id| *id == movement.upstream_id)
                .unwrap();
            let id = list.remove(from);
            let to = (movement.position as usize - 1).min(list.len());
            list.insert(to, id);
        }
        list
    }

    #[test]
    fn in_order_list_needs_no_call() {
        let plan = plan_associations(&current(&[1, 2, 3]), &members(&[1, 2, 3]));
        assert!(plan.removals.is_empty() && plan.additions.is_empty() && plan.moves.is_empty());
    }

    #[test]
    fn moving_the_first_to_the_end_is_one_call() {
        let plan = plan_associations(&current(&[1, 2, 3, 4]), &members(&[2, 3, 4, 1]));
        assert_eq!(
            plan.moves,
            vec![Move {
                upstream_id: 1,
                position: 4
            }]
        );
        assert_eq!(replay(&[1, 2, 3, 4], &plan), vec![2, 3, 4, 1]);
    }

    #[test]
    fn reversal_adds_and_removes_converge() {
        let cases: Vec<(Vec<i64>, Vec<i64>)> = vec![
            (vec![1, 2, 3, 4, 5], vec![5, 4, 3, 2, 1]),
            (vec![1, 2, 9], vec![3, 2, 1]),
            (vec![], vec![1, 2]),
            (vec![7, 8], vec![]),
            (vec![3, 1], vec![1, 2, 3]),
        ];
        for (start, want) in cases {
            let plan = plan_associations(&current(&start), &members(&want));
            assert_eq!(
                replay(&start, &plan),
                want,
                "{start:?} -> {want:?}: {plan:?}"
            );
            let final_ids: Vec<i64> = plan.final_order.iter().map(|a| a.upstream_id).collect();
            assert_eq!(final_ids, want);
        }
    }

    #[test]
    fn every_permutation_of_five_converges_with_the_fewest_moves() {
        fn permutations(items: Vec<i64>) -> Vec<Vec<i64>> {
            if items.len() <= 1 {
                return vec![items];
            }
            let mut all = Vec::new();
            for i in 0..items.len() {
                let mut rest = items.clone();
                let head = rest.remove(i);
                for mut tail in permutations(rest) {
                    tail.insert(0, head);
                    all.push(tail);
                }
            }
            all
        }
        let start = vec![1, 2, 3, 4, 5];
        for want in permutations(start.clone()) {
            let plan = plan_associations(&current(&start), &members(&want));
            assert_eq!(replay(&start, &plan), want);
            let positions: Vec<usize> = start
                .iter()
                .map(|id| want.iter().position(|w| w == id).unwrap())
                .collect();
            let fewest = start.len() - longest_increasing_run(&positions).len();
            assert_eq!(plan.moves.len(), fewest, "{want:?}");
        }
    }

    #[test]
    fn nothing_is_removed_while_a_member_is_unresolved() {
        let mut wanted = members(&[1]);
        wanted.push(DesiredMember {
            name: "quay".into(),
            resolution: Resolution::Pending,
        });
        let plan = plan_associations(&current(&[2, 1]), &wanted);
        assert!(plan.removals.is_empty());
        // Nor moved: the order is put right once quay has its id.
        assert!(plan.moves.is_empty());
        assert_eq!(replay(&[2, 1], &plan), vec![2, 1]);
        let plan = plan_associations(&current(&[2, 1]), &members(&[1, 3]));
        assert_eq!(plan.removals.len(), 1);
        assert_eq!(replay(&[2, 1], &plan), vec![1, 3]);
    }

    #[tokio::test]
    async fn inserts_into_one_registry_wait_for_each_other_and_others_do_not() {
        let views = Arc::new(RegistryViews::new(REGISTRY_VIEW_MAX_AGE));
        let first = views.hold_inserts("https://gitlab.example.com/", 7).await;
        // Another registry, or the same id on another GitLab, is free.
        drop(views.hold_inserts("https://gitlab.example.com/", 8).await);
        drop(views.hold_inserts("https://gitlab.other.example/", 7).await);

        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let waiting = tokio::spawn({
            let views = views.clone();
            async move {
                let _held = views.hold_inserts("https://gitlab.example.com/", 7).await;
                entered_tx.send(()).expect("receiver alive");
            }
        });
        // Give the second insert every chance to run: it must still be waiting.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            entered.try_recv().is_err(),
            "entered while the first held it"
        );
        drop(first);
        waiting.await.expect("second insert ran");
        assert!(entered.try_recv().is_ok());
    }

    fn member(name: &str, resolution: Resolution) -> DesiredMember {
        DesiredMember {
            name: name.into(),
            resolution,
        }
    }

    #[test]
    fn members_after_one_being_created_wait_so_the_order_needs_no_repositioning() {
        let waiting = [
            member("a", Resolution::Resolved(1)),
            member("b", Resolution::Pending),
            member("c", Resolution::Resolved(3)),
        ];
        let plan = plan_associations(&[], &waiting);
        assert_eq!(plan.additions, vec![1]);
        assert!(plan.moves.is_empty());
        assert_eq!(replay(&[], &plan), vec![1]);

        // b got its id: the rest is appended in declared order, nothing moves.
        let plan = plan_associations(&current(&[1]), &members(&[1, 2, 3]));
        assert_eq!(plan.additions, vec![2, 3]);
        assert!(plan.moves.is_empty());
        assert_eq!(replay(&[1], &plan), vec![1, 2, 3]);
    }

    #[test]
    fn a_blocked_member_holds_back_no_one_and_an_associated_later_member_keeps_its_place() {
        let blocked = [
            member("a", Resolution::Resolved(1)),
            member("b", Resolution::Blocked),
            member("c", Resolution::Resolved(3)),
        ];
        let plan = plan_associations(&[], &blocked);
        assert_eq!(plan.additions, vec![1, 3]);
        assert_eq!(replay(&[], &plan), vec![1, 3]);

        // Associated out of order while a member is being created (an upstream created
        // through the registry lands first): nothing added past the pending member, nothing
        // removed, nothing moved yet; once it has its id, one move puts the order right.
        let pending = [
            member("c", Resolution::Resolved(3)),
            member("b", Resolution::Pending),
            member("a", Resolution::Resolved(1)),
        ];
        let plan = plan_associations(&current(&[1, 3]), &pending);
        assert!(plan.additions.is_empty());
        assert!(plan.removals.is_empty());
        assert!(plan.moves.is_empty());
        let plan = plan_associations(&current(&[1, 3]), &members(&[3, 2, 1]));
        assert_eq!(plan.additions, vec![2]);
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(replay(&[1, 3], &plan), vec![3, 2, 1]);
    }

    #[test]
    fn resolution_reports_missing_before_pending() {
        let condition = resolution_condition(&[
            DesiredMember {
                name: "a".into(),
                resolution: Resolution::Pending,
            },
            DesiredMember {
                name: "b".into(),
                resolution: Resolution::Missing,
            },
        ]);
        assert_eq!(condition.reason, "UpstreamNotFound");
        assert!(condition.message.contains('b'));
        assert_eq!(resolution_condition(&members(&[1])).status, Status::True);
    }
}
