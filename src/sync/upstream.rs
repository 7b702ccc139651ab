//! The Upstream engine: makes one GitLab container upstream match its declared spec.
//!
//! GitLab creates upstreams only through a registry, never returns the password, clears the
//! stored credentials on a url change unless both username and password change in that same
//! request (`reset_credentials`), and can test a connection before a change. So this engine
//! adopts before it creates, creates through a registry that references the upstream, tests
//! before it creates or changes url or credentials (and with `gate_changes` keeps the working
//! configuration when the test fails), re-sends credentials when their Secret's version
//! changes, and after every url change sends them again in a second PATCH.

use crate::crd::reasons::Reason;
use std::time::Duration;

use jiff::Timestamp;

use super::listing::UpstreamListings;
use super::registry::RegistryViews;
use super::{Action, Error, FieldChange, Mode, Result, failure_condition};
use crate::crd::conditions::{ConditionUpdate, REACHABLE, SYNCED, Status};
use crate::gitlab::{
    GitLabClient, NewUpstream, PathOrId, RegistryUpstream, Upstream, UpstreamCredentials,
    UpstreamTestOverrides, UpstreamTestResult, UpstreamUpdate,
};

/// The upstream as declared, with its credentials already read from their Secret.
#[derive(Debug, Clone)]
pub struct DesiredUpstream {
    pub group: PathOrId,
    pub name: String,
    pub url: String,
    /// `None`: GitLab's description is left as it is.
    pub description: Option<String>,
    pub cache_validity_hours: i64,
    pub credentials: Option<ResolvedCredentials>,
    pub gate_changes: bool,
    pub connectivity_interval: Duration,
}

/// Credentials read from a Secret, with the version that identifies them.
#[derive(Debug, Clone)]
pub struct ResolvedCredentials {
    pub credentials: UpstreamCredentials,
    pub version: CredentialsVersion,
}

/// Which version of which Secret was sent to GitLab: never a value or a hash of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsVersion {
    pub secret_name: String,
    pub resource_version: String,
}

/// A connection test's outcome as GitLab reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectivityCheck {
    pub time: Timestamp,
    pub success: bool,
    pub result: Option<String>,
}

/// The configuration a connection test was run with: a test of another url or another
/// version of the credentials says nothing about this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestedConfiguration {
    pub url: String,
    pub credentials: Option<CredentialsVersion>,
}

impl TestedConfiguration {
    pub fn of(desired: &DesiredUpstream) -> Self {
        Self {
            url: desired.url.clone(),
            credentials: desired.credentials.as_ref().map(|c| c.version.clone()),
        }
    }
}

/// What the last status knew.
#[derive(Debug, Clone, Default)]
pub struct KnownUpstream {
    pub upstream_id: Option<i64>,
    pub group_id: Option<i64>,
    pub applied_credentials: Option<CredentialsVersion>,
    pub last_check: Option<ConnectivityCheck>,
    /// What `last_check` tested; `None` when unknown (a status written before it was recorded).
    pub last_check_configuration: Option<TestedConfiguration>,
    pub last_handled_purge_cache: Option<String>,
}

/// The registry an upstream is created through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateThrough {
    /// A registry GitLab holds, by its id.
    Registry(i64),
    /// A registry (by its name) that has no GitLab id yet because the plan being made
    /// creates it: a plan says the upstream would be created through it; an apply waits.
    RegistryThisPlanCreates(String),
}

/// One reconcile of one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub desired: DesiredUpstream,
    pub known: KnownUpstream,
    /// The registry that lists this upstream to create it through when it does not exist
    /// yet; `None` while there is none to create it through (it waits).
    pub registry_for_create: Option<CreateThrough>,
    /// Value of the purge-cache annotation, if set.
    pub purge_cache_request: Option<String>,
    pub now: Timestamp,
    pub mode: Mode,
}

/// What the reconcile did, and the status to write.
#[derive(Debug, Clone)]
pub struct UpstreamOutcome {
    pub upstream_id: Option<i64>,
    pub group_id: Option<i64>,
    pub applied_credentials: Option<CredentialsVersion>,
    pub last_check: Option<ConnectivityCheck>,
    pub last_check_configuration: Option<TestedConfiguration>,
    pub last_handled_purge_cache: Option<String>,
    pub synced: ConditionUpdate,
    /// `None` until a connection test has run.
    pub reachable: Option<ConditionUpdate>,
    pub actions: Vec<Action>,
    pub error: Option<Error>,
    /// When the next periodic connection test is due.
    pub next_check_in: Option<Duration>,
}

impl UpstreamOutcome {
    fn from_known(known: &KnownUpstream) -> Self {
        Self {
            upstream_id: known.upstream_id,
            group_id: known.group_id,
            applied_credentials: known.applied_credentials.clone(),
            last_check: known.last_check.clone(),
            last_check_configuration: known.last_check_configuration.clone(),
            last_handled_purge_cache: known.last_handled_purge_cache.clone(),
            synced: ConditionUpdate::new(
                SYNCED,
                Status::True,
                Reason::Synced.as_str(),
                "in line with the spec",
            ),
            reachable: None,
            actions: Vec::new(),
            error: None,
            next_check_in: None,
        }
    }
}

/// Where a reconcile may take its upstream from a group listing shared with the other
/// reconciles of the group, instead of its own `GET /upstreams/:id`.
#[derive(Clone, Copy)]
pub struct SharedListing<'a> {
    pub listings: &'a UpstreamListings,
    /// The GitLab url and token source the client stands for: listings are never shared
    /// between connections.
    pub connection: &'a str,
    /// The caller knows of no change since the last reconcile (its spec observed, that
    /// reconcile in sync, no reconcile requested): only then may the upstream be read from
    /// the listing. Writes are recorded in the listings either way.
    pub nothing_changed: bool,
    /// The registry views to tell when an upstream is created through a registry: that
    /// changes the registry's associations behind its view.
    pub registry_views: Option<&'a RegistryViews>,
}

/// Makes the GitLab upstream match `request.desired`. Never fails as a whole: a GitLab error
/// ends the reconcile with `Synced=False` and the error in `outcome.error`, while everything
/// done before it (a created id, applied credentials) is kept in the outcome.
pub async fn reconcile(client: &GitLabClient, request: &UpstreamRequest) -> UpstreamOutcome {
    reconcile_with_listing(client, request, None).await
}

/// As [`reconcile`], reading the upstream from `listing` when the caller knows of no change
/// since the last reconcile (`nothing_changed`) and the request agrees
/// ([`may_read_from_listing`]). Everything after the read is the same; an upstream the
/// listing does not serve is read with a GET as [`reconcile`] does, so a deleted one is still
/// GitLab's 404. Every upstream this reconcile wrote to (or may have, when it failed) is
/// recorded in the listings, so no listing sent before the write serves it again.
pub async fn reconcile_with_listing(
    client: &GitLabClient,
    request: &UpstreamRequest,
    listing: Option<SharedListing<'_>>,
) -> UpstreamOutcome {
    let mut outcome = UpstreamOutcome::from_known(&request.known);
    let mut pass = Pass::default();
    if let Err(error) = sync(client, request, listing, &mut outcome, &mut pass).await {
        outcome.synced = failure_condition(&error);
        outcome.error = Some(error);
    }
    if let Some(listing) = listing {
        record_writes(listing, request, &outcome, pass.created);
    }
    outcome.reachable = outcome.last_check.as_ref().map(reachable_condition);
    outcome.next_check_in = outcome.last_check.as_ref().map(|check| {
        let elapsed = request.now.duration_since(check.time).unsigned_abs();
        request
            .desired
            .connectivity_interval
            .saturating_sub(elapsed)
            .max(Duration::from_secs(1))
    });
    outcome
}

/// Tells the listings which upstreams this reconcile wrote to (or may have, when it failed),
/// so no listing sent before the write serves them again. An upstream it created, with
/// GitLab's whole answer, is served from that answer: the reconcile that follows (a registry
/// getting its id) reads nothing.
fn record_writes(
    listing: SharedListing<'_>,
    request: &UpstreamRequest,
    outcome: &UpstreamOutcome,
    created: Option<Upstream>,
) {
    let wrote = outcome.error.is_some() || outcome.actions.iter().any(|action| action.writes);
    if !wrote {
        return;
    }
    let (listings, connection, group) =
        (listing.listings, listing.connection, &request.desired.group);
    let created = created.filter(|_| outcome.error.is_none());
    let created_id = created.as_ref().map(|created| created.id);
    let written: Vec<i64> = [request.known.upstream_id, outcome.upstream_id]
        .into_iter()
        .flatten()
        .filter(|id| Some(*id) != created_id)
        .collect();
    if written.is_empty() && created.is_none() {
        // A create that failed may still have been carried out.
        listings.record_write(connection, group, None);
    }
    for id in written {
        listings.record_write(connection, group, Some(id));
    }
    if let Some(created) = created {
        listings.record_write_result(connection, group, created);
    }
}

/// Whether the request itself leaves the remote read to a listing: an upstream we know, in
/// apply mode, whose credentials and purge requests were all handled. A Secret change or a
/// pending purge reads fresh, as does `plan` (it shows what a GET shows).
pub fn may_read_from_listing(request: &UpstreamRequest) -> bool {
    let known = &request.known;
    let credentials_unchanged = request
        .desired
        .credentials
        .as_ref()
        .map(|resolved| &resolved.version)
        == known.applied_credentials.as_ref();
    let purge_handled = request.purge_cache_request.is_none()
        || request.purge_cache_request == known.last_handled_purge_cache;
    request.mode.writes() && known.upstream_id.is_some() && credentials_unchanged && purge_handled
}

/// What one pass of [`sync`] did besides the outcome.
#[derive(Default)]
struct Pass {
    /// A connection test ran in this reconcile.
    tested_now: bool,
    /// The upstream as GitLab answered our create.
    created: Option<Upstream>,
}

async fn sync(
    client: &GitLabClient,
    request: &UpstreamRequest,
    listing: Option<SharedListing<'_>>,
    outcome: &mut UpstreamOutcome,
    pass: &mut Pass,
) -> Result<()> {
    let desired = &request.desired;
    let writes = request.mode.writes();
    let remote = match find_remote_testing_new(client, request, listing, outcome, pass).await? {
        Some(remote) => remote,
        None => return create(client, request, listing, outcome, pass).await,
    };
    outcome.upstream_id = Some(remote.id);
    outcome.group_id = Some(remote.group_id);

    let mut update = UpstreamUpdate::default();
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
        if current != description {
            changes.push(FieldChange::new(
                "description",
                Some(current),
                Some(description),
            ));
            update.description = Some(description.clone());
        }
    }
    if remote.cache_validity_hours != desired.cache_validity_hours {
        changes.push(FieldChange::new(
            "cacheValidityHours",
            Some(remote.cache_validity_hours),
            Some(desired.cache_validity_hours),
        ));
        update.cache_validity_hours = Some(desired.cache_validity_hours);
    }

    // url and credentials are gated together by a connection test; GitLab clears stored
    // credentials on a url change, so they are re-sent after it.
    let url_changed = remote.url != desired.url;
    let credentials_changed = credentials_differ(desired, &remote, outcome);
    let mut credentials_update = None;
    if url_changed || credentials_changed {
        let mut connection_changes = Vec::new();
        if url_changed {
            connection_changes.push(FieldChange::new(
                "url",
                Some(&remote.url),
                Some(&desired.url),
            ));
        }
        if credentials_changed || (url_changed && desired.credentials.is_some()) {
            connection_changes.push(credentials_change(desired, &remote));
        }
        let mut blocked_by = None;
        if writes {
            let overrides = UpstreamTestOverrides {
                url: url_changed.then(|| desired.url.clone()),
                credentials: match &desired.credentials {
                    Some(resolved) => Some(resolved.credentials.clone()),
                    // GitLab tests the stored credentials when none are sent with the stored
                    // url; both blank test anonymously, as the upstream will be (INFERRED).
                    None if !url_changed => Some(no_credentials()),
                    // A new url without credentials is tested anonymously.
                    None => None,
                },
            };
            let result = client.test_existing_upstream(remote.id, &overrides).await?;
            if result.success || !desired.gate_changes {
                // The tested configuration is the one GitLab will hold: it is the current check.
                pass.tested_now = true;
                record_check(outcome, &result, request);
            } else {
                blocked_by = Some(
                    result
                        .result
                        .unwrap_or_else(|| "connection test failed".into()),
                );
            }
        }
        if let Some(result) = blocked_by {
            outcome.synced = ConditionUpdate::new(
                SYNCED,
                false,
                Reason::ConnectivityTestFailed.as_str(),
                format!("kept the working url and credentials: {result}"),
            );
            outcome.actions.push(
                Action::new(
                    Reason::ConnectivityTestFailed.as_str(),
                    format!("change of url or credentials blocked: {result}"),
                )
                .read_only(),
            );
        } else {
            if url_changed {
                update.url = Some(desired.url.clone());
            }
            credentials_update = match &desired.credentials {
                Some(resolved) => Some(resolved.credentials.clone()),
                // A url change without credentials makes GitLab clear the stored ones: that
                // is the removal, and the PATCH carries only what changed.
                None if url_changed => None,
                // Removing credentials: both go empty (GitLab's presence rules want both).
                None => Some(no_credentials()),
            };
            changes.extend(connection_changes);
        }
    }

    // GitLab's `reset_credentials` clears username and password on a url change unless both
    // change in the same request, and re-sending the stored ones is no change: credentials
    // survive a url change only when they come in a later request. So a url change is one
    // PATCH, and the credentials follow in a second; without a url change they travel with
    // the other fields. Either way it is one change.
    let credentials_patch = match credentials_update {
        Some(credentials) if update.url.is_some() => Some(UpstreamUpdate {
            credentials: Some(credentials),
            ..UpstreamUpdate::default()
        }),
        credentials => {
            update.credentials = credentials;
            None
        }
    };
    if !update.is_empty() || credentials_patch.is_some() {
        // Credentials sent, or cleared by GitLab with a url change: either way GitLab now
        // holds the declared ones.
        let credentials_applied =
            update.credentials.is_some() || credentials_patch.is_some() || update.url.is_some();
        if writes {
            if !update.is_empty() {
                client.update_upstream(remote.id, &update).await?;
                if update.url.is_some() {
                    // GitLab holds no credentials until the second PATCH lands.
                    outcome.applied_credentials = None;
                }
            }
            if let Some(credentials) = &credentials_patch {
                client.update_upstream(remote.id, credentials).await?;
            }
        }
        if credentials_applied {
            outcome.applied_credentials = desired.credentials.as_ref().map(|c| c.version.clone());
        }
        outcome.actions.push(
            Action::new(
                Reason::Updated.as_str(),
                format!("updated upstream {}", remote.id),
            )
            .with_changes(changes),
        );
    }

    if writes && !pass.tested_now && check_due(request, outcome) {
        let result = client
            .test_existing_upstream(remote.id, &UpstreamTestOverrides::default())
            .await?;
        pass.tested_now = true;
        record_check(outcome, &result, request);
    }
    purge_cache_if_requested(client, request, outcome, remote.id).await
}

/// As [`find_remote`]; for an upstream not created yet, GitLab's group-level connection test
/// of the declared url and credentials runs alongside the adoption lookup (unless a test of
/// them within the interval is on record), so a new upstream's create waits for one round
/// trip, not two. When an upstream is adopted after all, the test counts as its check; a
/// test that could not be sent then fails nothing: the adopted upstream is tested as usual.
async fn find_remote_testing_new(
    client: &GitLabClient,
    request: &UpstreamRequest,
    listing: Option<SharedListing<'_>>,
    outcome: &mut UpstreamOutcome,
    pass: &mut Pass,
) -> Result<Option<Upstream>> {
    let test_alongside = request.mode.writes()
        && request.known.upstream_id.is_none()
        && !last_check_covers_desired(request, outcome);
    if !test_alongside {
        return find_remote(client, request, listing, outcome).await;
    }
    let desired = &request.desired;
    let credentials = desired.credentials.as_ref().map(|c| &c.credentials);
    let (found, tested) = tokio::join!(
        find_remote(client, request, listing, outcome),
        client.test_upstream_connection(&desired.group, &desired.url, credentials),
    );
    // A test that was answered is on record even when the lookup failed.
    let test_error = match tested {
        Ok(result) => {
            pass.tested_now = true;
            record_check(outcome, &result, request);
            None
        }
        Err(error) => Some(error),
    };
    let found = found?;
    match test_error {
        Some(error) if found.is_none() => Err(error.into()),
        _ => Ok(found),
    }
}

/// The remote upstream: by id when known, from the shared listing when it serves it, else
/// with a GET (a 404 means it was deleted in GitLab and will be re-created); else adopted by
/// exact name and url from the group's list.
async fn find_remote(
    client: &GitLabClient,
    request: &UpstreamRequest,
    listing: Option<SharedListing<'_>>,
    outcome: &mut UpstreamOutcome,
) -> Result<Option<Upstream>> {
    let desired = &request.desired;
    if let Some(id) = request.known.upstream_id {
        let drift_read =
            listing.filter(|listing| listing.nothing_changed && may_read_from_listing(request));
        if let Some(listing) = drift_read {
            let listed = listing
                .listings
                .listed(client, listing.connection, &desired.group, id, request.now)
                .await;
            if listed.is_some() {
                return Ok(listed);
            }
        }
        match client.get_upstream(id).await {
            Ok(remote) => return Ok(Some(remote)),
            Err(error) if error.is_not_found() => {
                outcome.upstream_id = None;
                outcome.applied_credentials = None;
                outcome.actions.push(
                    Action::new(
                        Reason::NotFound.as_str(),
                        format!("upstream {id} is gone from GitLab"),
                    )
                    .read_only(),
                );
            }
            Err(error) => return Err(error.into()),
        }
    }
    let adopted = match listing.filter(|_| request.mode.writes()) {
        Some(listing) => listing
            .listings
            .adoptable(
                client,
                listing.connection,
                &desired.group,
                request.now,
                |upstream| is_adoptable(desired, upstream),
            )
            .await?
            .into_iter()
            .min_by_key(|upstream| upstream.id),
        None => find_adoptable(client, desired).await?,
    };
    if let Some(remote) = &adopted {
        // What GitLab holds as credentials is unknown unless the caller vouches for a version
        // (standalone mode, which keeps no status): with none known, ours are sent once.
        outcome.actions.push(
            Action::new(
                Reason::Adopted.as_str(),
                format!("adopted existing upstream {} ({})", remote.id, remote.name),
            )
            .read_only(),
        );
    }
    Ok(adopted)
}

/// The group's upstream that is ours to adopt. Upstream names are not unique in GitLab:
/// adopt only on name and url both.
async fn find_adoptable(
    client: &GitLabClient,
    desired: &DesiredUpstream,
) -> Result<Option<Upstream>> {
    Ok(client
        .list_group_upstreams_all(&desired.group, Some(&desired.name))
        .await?
        .into_iter()
        .filter(|upstream| is_adoptable(desired, upstream))
        .min_by_key(|upstream| upstream.id))
}

fn is_adoptable(desired: &DesiredUpstream, upstream: &Upstream) -> bool {
    upstream.name == desired.name && upstream.url == desired.url
}

async fn create(
    client: &GitLabClient,
    request: &UpstreamRequest,
    listing: Option<SharedListing<'_>>,
    outcome: &mut UpstreamOutcome,
    pass: &mut Pass,
) -> Result<()> {
    let desired = &request.desired;
    let credentials = desired.credentials.as_ref().map(|c| &c.credentials);
    // GitLab tests a configuration at group level, before any registry exists: the test runs
    // as soon as the upstream is declared, so a wrong url or credentials show while the
    // registry is still being created, and the create need not wait for a second test. A test
    // of this url and credentials within the connection-test interval is reused.
    if request.mode.writes() && !last_check_covers_desired(request, outcome) {
        let result = client
            .test_upstream_connection(&desired.group, &desired.url, credentials)
            .await?;
        pass.tested_now = true;
        record_check(outcome, &result, request);
    }
    let covered = last_check_covers_desired(request, outcome);
    if desired.gate_changes
        && covered
        && let Some(check) = outcome.last_check.as_ref().filter(|check| !check.success)
    {
        let message = check
            .result
            .clone()
            .unwrap_or_else(|| "connection test failed".into());
        outcome.synced = ConditionUpdate::new(
            SYNCED,
            false,
            Reason::ConnectivityTestFailed.as_str(),
            format!("not created: {message}"),
        );
        if pass.tested_now {
            outcome.actions.push(
                Action::new(
                    Reason::ConnectivityTestFailed.as_str(),
                    format!("not created: {message}"),
                )
                .read_only(),
            );
        }
        return Ok(());
    }
    // Only a plan may go through a registry that does not exist yet.
    let Some(through) = request
        .registry_for_create
        .as_ref()
        .filter(|through| !request.mode.writes() || matches!(through, CreateThrough::Registry(_)))
    else {
        waiting_for_registry(outcome);
        return Ok(());
    };
    let mut changes = vec![
        FieldChange::new("name", None::<String>, Some(&desired.name)),
        FieldChange::new("url", None::<String>, Some(&desired.url)),
        FieldChange::new(
            "cacheValidityHours",
            None::<String>,
            Some(desired.cache_validity_hours),
        ),
    ];
    if let Some(description) = &desired.description {
        changes.push(FieldChange::new(
            "description",
            None::<String>,
            Some(description),
        ));
    }
    if desired.credentials.is_some() {
        changes.push(FieldChange::sensitive("credentials"));
    }
    let new_upstream = NewUpstream {
        name: desired.name.clone(),
        url: desired.url.clone(),
        description: desired.description.clone(),
        cache_validity_hours: Some(desired.cache_validity_hours),
        credentials: credentials.cloned(),
    };
    if let (true, &CreateThrough::Registry(registry_id)) = (request.mode.writes(), through) {
        let views = listing.and_then(|listing| {
            listing
                .registry_views
                .map(|views| (views, listing.connection))
        });
        let held = match views {
            Some((views, _)) => Some(
                views
                    .hold_inserts(client.base_url().as_str(), registry_id)
                    .await,
            ),
            None => None,
        };
        let created = client.create_upstream(registry_id, &new_upstream).await;
        if let Some((views, connection)) = views {
            match created
                .as_ref()
                .ok()
                .and_then(|c| c.registry_upstream.as_ref())
            {
                Some(association) => views.record_insert(
                    connection,
                    &RegistryUpstream {
                        registry_id: association.registry_id.or(Some(registry_id)),
                        upstream_id: association
                            .upstream_id
                            .or_else(|| created.as_ref().ok().map(|c| c.id)),
                        ..association.clone()
                    },
                ),
                // Not created, or not said where (a timeout may have created it anyway):
                // the registry's next reconcile reads it.
                None => views.forget(connection, registry_id),
            }
        }
        drop(held);
        let created = match created {
            Ok(created) => created,
            // Another writer created the same upstream between our lookup and our POST:
            // GitLab refuses the duplicate url and credentials; adopt theirs when it is ours
            // by name and url, else report GitLab's refusal.
            Err(error)
                if error
                    .field_errors()
                    .is_some_and(|fields| fields.contains_key("group")) =>
            {
                let Some(raced) = find_adoptable(client, desired).await? else {
                    return Err(error.into());
                };
                outcome.upstream_id = Some(raced.id);
                outcome.group_id = Some(raced.group_id);
                outcome.applied_credentials = None;
                outcome.actions.push(
                    Action::new(
                        Reason::Adopted.as_str(),
                        format!("adopted upstream {} created concurrently", raced.id),
                    )
                    .read_only(),
                );
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
        outcome.upstream_id = Some(created.id);
        outcome.group_id = Some(created.group_id);
        pass.created = Some(created.clone());
        outcome.actions.push(
            Action::new(
                Reason::Created.as_str(),
                format!(
                    "created upstream {} through registry {registry_id}",
                    created.id
                ),
            )
            .with_changes(changes),
        );
    } else {
        outcome.actions.push(
            Action::new(Reason::Created.as_str(), would_create_through(through))
                .with_changes(changes),
        );
    }
    outcome.applied_credentials = desired.credentials.as_ref().map(|c| c.version.clone());
    Ok(())
}

fn waiting_for_registry(outcome: &mut UpstreamOutcome) {
    outcome.synced = ConditionUpdate::new(
        SYNCED,
        false,
        Reason::WaitingForRegistry.as_str(),
        "GitLab creates upstreams only through a virtual registry: waiting for a VirtualRegistry \
             in this namespace that lists this Upstream and has a GitLab id",
    );
}

/// Blank username and password: how GitLab is told "no credentials" without a url change.
fn no_credentials() -> UpstreamCredentials {
    UpstreamCredentials::new("", String::new().into())
}

fn would_create_through(through: &CreateThrough) -> String {
    match through {
        CreateThrough::Registry(id) => format!("would create through registry {id}"),
        CreateThrough::RegistryThisPlanCreates(name) => {
            format!("would create through registry {name}, which this plan creates")
        }
    }
}

fn credentials_differ(
    desired: &DesiredUpstream,
    remote: &Upstream,
    outcome: &UpstreamOutcome,
) -> bool {
    match &desired.credentials {
        Some(resolved) => {
            outcome.applied_credentials.as_ref() != Some(&resolved.version)
                || remote.username.as_deref() != Some(resolved.credentials.username.as_str())
        }
        None => remote
            .username
            .as_deref()
            .is_some_and(|name| !name.is_empty()),
    }
}

fn credentials_change(desired: &DesiredUpstream, remote: &Upstream) -> FieldChange {
    match (&desired.credentials, &remote.username) {
        (Some(_), _) => FieldChange::sensitive("credentials"),
        (None, Some(_)) => FieldChange::new("credentials", Some(super::SENSITIVE), Some("(none)")),
        (None, None) => FieldChange::new("credentials", Some("(none)"), Some("(none)")),
    }
}

fn check_due(request: &UpstreamRequest, outcome: &UpstreamOutcome) -> bool {
    match &outcome.last_check {
        None => true,
        Some(check) => {
            request.now.duration_since(check.time).unsigned_abs()
                >= request.desired.connectivity_interval
        }
    }
}

/// Records a test of the declared configuration: every test this engine runs is of what
/// the spec declares (an override test of a change, a periodic test once GitLab holds it).
fn record_check(
    outcome: &mut UpstreamOutcome,
    result: &UpstreamTestResult,
    request: &UpstreamRequest,
) {
    outcome.last_check = Some(ConnectivityCheck {
        time: request.now,
        success: result.success,
        result: result.result.clone(),
    });
    outcome.last_check_configuration = Some(TestedConfiguration::of(&request.desired));
}

/// Whether the last test still vouches for the declared configuration: it tested this url
/// with this version of the credentials, within the connection-test interval.
fn last_check_covers_desired(request: &UpstreamRequest, outcome: &UpstreamOutcome) -> bool {
    outcome.last_check.is_some()
        && !check_due(request, outcome)
        && outcome.last_check_configuration.as_ref()
            == Some(&TestedConfiguration::of(&request.desired))
}

async fn purge_cache_if_requested(
    client: &GitLabClient,
    request: &UpstreamRequest,
    outcome: &mut UpstreamOutcome,
    upstream_id: i64,
) -> Result<()> {
    let action = super::purge_once(
        request.purge_cache_request.as_ref(),
        &mut outcome.last_handled_purge_cache,
        request.mode,
        format!("upstream {upstream_id}"),
        || client.purge_upstream_cache(upstream_id),
    )
    .await?;
    outcome.actions.extend(action);
    Ok(())
}

/// `Reachable` from a connection test, with a reason read from GitLab's result text.
pub fn reachable_condition(check: &ConnectivityCheck) -> ConditionUpdate {
    if check.success {
        return ConditionUpdate::new(
            REACHABLE,
            true,
            Reason::Reachable.as_str(),
            "GitLab reached the upstream",
        );
    }
    let result = check
        .result
        .clone()
        .unwrap_or_else(|| "connection test failed".into());
    ConditionUpdate::new(REACHABLE, false, unreachable_reason(&result), result)
}

/// Maps GitLab's test result to a stable reason. GitLab reports the upstream's status as
/// `Error: <code> - <reason phrase>` (`Error: 401 - Unauthorized`, `Error: 503 - Service
/// Unavailable`) and a transport failure as `Error: <exception message>`
/// (`Error: Connection timeout`, …). The `Error: 5XX - Server Error` of the first SEMANTICS
/// reading is still understood.
pub fn unreachable_reason(result: &str) -> &'static str {
    let status = result
        .trim_start_matches("Error:")
        .trim_start()
        .split(" - ")
        .next()
        .and_then(|code| code.trim().parse::<u16>().ok());
    match status {
        Some(401) => return Reason::Unauthorized.as_str(),
        Some(403) => return Reason::Forbidden.as_str(),
        Some(500..=599) => return Reason::ServerError.as_str(),
        Some(_) => return Reason::Unreachable.as_str(),
        None => {}
    }
    let lower = result.to_ascii_lowercase();
    if lower.contains("unauthorized") {
        Reason::Unauthorized.as_str()
    } else if lower.contains("forbidden") {
        Reason::Forbidden.as_str()
    } else if lower.contains("5xx") || lower.contains("server error") {
        Reason::ServerError.as_str()
    } else if lower.contains("timeout") || lower.contains("timed out") {
        Reason::Timeout.as_str()
    } else {
        Reason::Unreachable.as_str()
    }
}

/// Deletes the upstream in GitLab; one already gone counts as deleted.
pub async fn delete(client: &GitLabClient, upstream_id: i64, mode: Mode) -> Result<Action> {
    if mode.writes() {
        match client.delete_upstream(upstream_id).await {
            Ok(()) => {}
            Err(error) if error.is_not_found() => {
                return Ok(Action::new(
                    Reason::Deleted.as_str(),
                    format!("upstream {upstream_id} was already gone"),
                )
                .read_only());
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(Action::new(
        Reason::Deleted.as_str(),
        format!("deleted upstream {upstream_id}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_gitlab_result_texts() {
        assert_eq!(
            unreachable_reason("Error: 401 - Unauthorized"),
            "Unauthorized"
        );
        assert_eq!(unreachable_reason("Error: 403 - Forbidden"), "Forbidden");
        assert_eq!(
            unreachable_reason("Error: 5XX - Server Error"),
            "ServerError"
        );
        assert_eq!(
            unreachable_reason("Error: 503 - Service Unavailable"),
            "ServerError"
        );
        assert_eq!(
            unreachable_reason("Error: 500 - Internal Server Error"),
            "ServerError"
        );
        assert_eq!(
            unreachable_reason("Error: 429 - Too Many Requests"),
            "Unreachable"
        );
        assert_eq!(unreachable_reason("Error: Connection timeout"), "Timeout");
        assert_eq!(
            unreachable_reason("Error: connection refused"),
            "Unreachable"
        );
    }

    #[test]
    fn a_successful_check_is_reachable() {
        let check = ConnectivityCheck {
            time: Timestamp::UNIX_EPOCH,
            success: true,
            result: None,
        };
        let condition = reachable_condition(&check);
        assert_eq!(condition.status, Status::True);
        let failed = ConnectivityCheck {
            success: false,
            result: Some("Error: 401 - Unauthorized".into()),
            ..check
        };
        let condition = reachable_condition(&failed);
        assert_eq!(condition.status, Status::False);
        assert_eq!(condition.reason, "Unauthorized");
        assert_eq!(condition.message, "Error: 401 - Unauthorized");
    }
}
