//! The CleanupPolicy controller: keeps the schedule (a missed slot runs once), runs cleanups
//! through `sync::cleanup` (or syncs GitLab's own policy for strategy `GitLabPolicy`), and
//! reports every run in `status.lastRun`, an Event and metrics. `keepInUse` reads the Pod
//! cache; until it is synced, runs delete nothing. Deletions over `maxDeletionPercent` wait
//! for the annotation `gitlabregistry.io/approve-deletion` naming their fingerprint; the run
//! that asks for it ends `NeedsApproval` (status, a Warning Event, a metric).

use crate::crd::reasons::Reason;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::connection::gitlab_client;
use super::status::{apply_status, mark_suspended, now, publish, publish_actions};
use super::world::Stores;
use super::{Context, Error, Result, reconciler, tenancy};
use crate::cleanup::{InUseIndex, Schedule};
use crate::crd::cleanup_policy::{CleanupPolicyStatus, RunOutcome};
use crate::crd::conditions::{self, ConditionUpdate, SYNCED};
use crate::crd::{CleanupPolicy, CleanupStrategy, RUN_REQUESTED_AT};
use crate::gitlab::ContainerExpirationPolicyUpdate;
use crate::resolve;
use crate::sync::Mode;
use crate::sync::cleanup::{
    CleanupReport, CleanupTarget, DesiredGitLabPolicy, InUse, run_cleanup, sync_gitlab_policy,
};

/// The images Pods run, for `keepInUse`: each Pod's images and image ids, not the Pod, kept
/// from the Pod watch's events. A reflector store would hold every Pod as a `Pod` struct:
/// stripped to its images that is still ~8 KB a Pod (the k8s-openapi structs are large even
/// when empty), 25 MB for 3,000 Pods; the image strings are ~0.3 KB.
#[derive(Clone, Default)]
pub struct PodImages {
    cache: Arc<std::sync::RwLock<PodImageCache>>,
}

impl PodImages {
    /// Takes one event of the Pod watch (a watch error is retried by the watcher itself).
    pub fn apply(&self, event: kube::runtime::watcher::Event<Pod>) {
        self.cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(event);
    }

    /// What runs now, or why that is not known.
    pub fn in_use(&self) -> InUse {
        let cache = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !cache.synced {
            return InUse::Unavailable("the Pod cache has not synced yet".into());
        }
        let mut index = InUseIndex::new();
        for image in cache.pods.values().flat_map(|images| images.iter()) {
            index.add(image);
        }
        InUse::Known(Arc::new(index))
    }
}

/// The images of every Pod by `namespace/name`, with the watcher's list semantics: a
/// (re)list is collected aside and replaces the cache when complete, so a run during a
/// relist still sees every Pod of the last one. Synced from the first complete list on.
#[derive(Default)]
struct PodImageCache {
    pods: std::collections::HashMap<String, Box<[String]>>,
    relisted: Option<std::collections::HashMap<String, Box<[String]>>>,
    synced: bool,
}

impl PodImageCache {
    fn apply(&mut self, event: kube::runtime::watcher::Event<Pod>) {
        use kube::runtime::watcher::Event;
        match event {
            Event::Init => self.relisted = Some(Default::default()),
            Event::InitApply(pod) => {
                let target = self.relisted.as_mut().unwrap_or(&mut self.pods);
                target.insert(pod_key(&pod), pod_images(&pod));
            }
            Event::InitDone => {
                if let Some(relisted) = self.relisted.take() {
                    self.pods = relisted;
                }
                self.synced = true;
            }
            Event::Apply(pod) => {
                self.pods.insert(pod_key(&pod), pod_images(&pod));
            }
            Event::Delete(pod) => {
                self.pods.remove(&pod_key(&pod));
            }
        }
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Every image and imageID of a Pod's containers (init and ephemeral included), each once.
/// Pure.
pub fn pod_images(pod: &Pod) -> Box<[String]> {
    let mut images: Vec<&str> = Vec::new();
    if let Some(spec) = &pod.spec {
        images.extend(spec.containers.iter().filter_map(|c| c.image.as_deref()));
        images.extend(
            spec.init_containers
                .iter()
                .flatten()
                .filter_map(|c| c.image.as_deref()),
        );
        images.extend(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .filter_map(|c| c.image.as_deref()),
        );
    }
    if let Some(status) = &pod.status {
        let statuses = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .chain(status.ephemeral_container_statuses.iter().flatten());
        for container in statuses {
            images.push(&container.image);
            images.push(&container.image_id);
        }
    }
    images.retain(|image| !image.trim().is_empty());
    images.sort_unstable();
    images.dedup();
    images.into_iter().map(str::to_owned).collect()
}

pub async fn reconcile(policy: Arc<CleanupPolicy>, ctx: Arc<Context>) -> Result<Requeue> {
    reconciler::reconcile(
        policy,
        ctx,
        |policy, ctx, api| async move { apply(&policy, &ctx, &api).await },
        |policy, ctx| async move { cleanup(&policy, &ctx).await },
    )
    .await
}

pub fn error_policy(policy: Arc<CleanupPolicy>, error: &Error, ctx: Arc<Context>) -> Requeue {
    reconciler::error_policy(policy, error, ctx)
}

async fn apply(policy: &CleanupPolicy, ctx: &Context, api: &Api<CleanupPolicy>) -> Result<Requeue> {
    let current = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let mut status = current.clone();
    status.observed_generation = generation;
    let stamp = now();
    if policy.spec.suspend {
        status.next_run_time = None;
        mark_suspended(
            &mut status.conditions,
            generation,
            "spec.suspend is true: no run is scheduled",
        );
        apply_status(api, policy, policy.status.as_ref(), &status).await?;
        return Ok(Requeue::await_change());
    }
    let outcome = match tenancy::check_policy(ctx, policy) {
        Err(error) => Err(error),
        Ok(()) => match policy.spec.strategy {
            CleanupStrategy::Operator => scheduled_run(policy, ctx, &mut status).await,
            CleanupStrategy::GitLabPolicy => gitlab_policy(policy, ctx, &mut status).await,
        },
    };
    let (synced, requeue, error) = match outcome {
        Ok((synced, requeue)) => (synced, requeue, None),
        Err(error) => (
            ConditionUpdate::new(SYNCED, false, error.reason(), error.message()),
            ctx.config.resync,
            Some(error),
        ),
    };
    conditions::set_condition(&mut status.conditions, synced, generation, &stamp);
    let ready = conditions::ready_summary(&status.conditions, &[SYNCED]);
    conditions::set_condition(&mut status.conditions, ready, generation, &stamp);
    apply_status(api, policy, policy.status.as_ref(), &status).await?;
    match error {
        Some(error) => Err(error),
        None => Ok(Requeue::requeue(requeue)),
    }
}

/// Runs the cleanup when a slot is due or a run was requested; returns `Synced` and when to
/// look again.
async fn scheduled_run(
    policy: &CleanupPolicy,
    ctx: &Context,
    status: &mut CleanupPolicyStatus,
) -> Result<(ConditionUpdate, Duration)> {
    let spec = &policy.spec;
    let schedule = Schedule::parse(&spec.schedule, &spec.time_zone)
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let now_instant = Timestamp::now();
    let created = policy
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now_instant, |t| t.0);
    let requested = policy.annotations().get(RUN_REQUESTED_AT).cloned();
    let run_requested = requested.is_some() && requested != status.last_handled_run_request;
    let due = schedule.due(
        status.last_schedule_time.as_ref().map(|t| t.0),
        created,
        now_instant,
    );
    let slot = match due {
        crate::cleanup::Due::Now { slot, .. } => Some(slot),
        _ => None,
    };
    let mut synced = ConditionUpdate::new(
        SYNCED,
        true,
        Reason::Scheduled.as_str(),
        "waiting for the next slot",
    );
    if slot.is_some() || run_requested {
        let in_use = if spec.safety.keep_in_use {
            match &ctx.pods {
                Some(pods) => pods.in_use(),
                None => InUse::Unavailable("the operator does not watch Pods".into()),
            }
        } else {
            InUse::Known(Arc::new(InUseIndex::new()))
        };
        let run = resolve::cleanup_policy::request(
            policy,
            &Stores::of(ctx),
            in_use,
            now_instant,
            Mode::Apply,
        )?;
        let namespace = policy.namespace().unwrap_or_default();
        let client = gitlab_client(ctx, &namespace, spec.gitlab.as_ref()).await?;
        if let CleanupTarget::Group { group, .. } = &run.target {
            tenancy::check_group_expansion(ctx, policy, &client, group).await?;
        }
        let started = Timestamp::now();
        let report = run_cleanup(&client, &run).await?;
        let finished = Timestamp::now();
        status.last_run = Some(resolve::cleanup_policy::run_summary(
            &report, started, finished,
        ));
        if let Some(slot) = slot {
            status.last_schedule_time = Some(Time(slot));
        }
        if run_requested {
            status.last_handled_run_request = requested;
        }
        record_run(ctx, policy, &report).await;
        synced = resolve::cleanup_policy::run_condition(&report);
        if let Some(error) = &report.error
            && error.is_transient()
        {
            // The schedule moves on; GitLab's trouble is reported and the next slot retries.
            tracing::warn!(reason = error.reason(), "cleanup run stopped early");
        }
    }
    let next = schedule.next_after(Timestamp::now());
    status.next_run_time = next.map(Time);
    let wait = next
        .map(|next| next.duration_since(Timestamp::now()).unsigned_abs())
        .unwrap_or(ctx.config.resync)
        .min(ctx.config.resync)
        .max(Duration::from_secs(1));
    Ok((synced, wait))
}

async fn record_run(ctx: &Context, policy: &CleanupPolicy, report: &CleanupReport) {
    let metrics = &ctx.metrics;
    let deleted_outcome = if report.simulated() {
        "would_delete"
    } else {
        "deleted"
    };
    metrics.count_tags("evaluated", "none", report.tags_evaluated as u64);
    metrics.count_tags(deleted_outcome, "none", report.tags_deleted as u64);
    for (reason, count) in &report.kept_by_reason {
        metrics.count_tags("kept", reason.as_str(), *count as u64);
    }
    metrics.count_run(report.outcome.as_str());
    metrics.count_pending_approvals(report.pending_approvals.len() as u64);
    metrics.count_tags(
        "pending_approval",
        "none",
        report
            .pending_approvals
            .iter()
            .map(|pending| pending.would_delete as u64)
            .sum(),
    );
    let (type_, reason) = match report.outcome {
        RunOutcome::Succeeded => (EventType::Normal, Reason::CleanupCompleted.as_str()),
        RunOutcome::Partial => (EventType::Warning, Reason::CleanupPartial.as_str()),
        RunOutcome::Failed => (EventType::Warning, Reason::CleanupFailed.as_str()),
        RunOutcome::NeedsApproval => (EventType::Warning, Reason::NeedsApproval.as_str()),
    };
    let verb = if report.simulated() {
        "would delete"
    } else {
        "deleted"
    };
    let note = format!(
        "{} repositories, {} tags evaluated, {verb} {}, kept {} ({} protected), {} failures. {}",
        report.repositories,
        report.tags_evaluated,
        report.tags_deleted,
        report.tags_kept,
        report.tags_protected,
        report.failures,
        report.message
    );
    publish(ctx, policy, type_, reason, &note).await;
}

async fn gitlab_policy(
    policy: &CleanupPolicy,
    ctx: &Context,
    status: &mut CleanupPolicyStatus,
) -> Result<(ConditionUpdate, Duration)> {
    let project = resolve::cleanup_policy::gitlab_policy_project(policy)?;
    let desired = DesiredGitLabPolicy::from_spec(&policy.spec)?;
    let namespace = policy.namespace().unwrap_or_default();
    let client = gitlab_client(ctx, &namespace, policy.spec.gitlab.as_ref()).await?;
    let outcome = sync_gitlab_policy(&client, &project, &desired, Mode::Apply).await?;
    status.next_run_time = outcome.next_run_at.map(Time);
    if let Some(action) = &outcome.action {
        publish_actions(ctx, policy, std::slice::from_ref(action)).await;
    }
    let message = if outcome.notes.is_empty() {
        format!("GitLab runs the cleanup policy of {project}")
    } else {
        outcome.notes.join("; ")
    };
    Ok((
        ConditionUpdate::new(SYNCED, true, Reason::Synced.as_str(), message),
        ctx.config.resync,
    ))
}

/// On deletion, a GitLab-run policy is switched off: the cleanup was ours to run.
async fn cleanup(policy: &CleanupPolicy, ctx: &Context) -> Result<Requeue> {
    if policy.spec.strategy != CleanupStrategy::GitLabPolicy {
        return Ok(Requeue::await_change());
    }
    let Ok(project) = resolve::cleanup_policy::gitlab_policy_project(policy) else {
        return Ok(Requeue::await_change());
    };
    let checked = tenancy::check_policy(ctx, policy);
    if !tenancy::may_clean_up_in_gitlab(checked, "CleanupPolicy", &policy.name_any()) {
        return Ok(Requeue::await_change());
    }
    let namespace = policy.namespace().unwrap_or_default();
    let client = gitlab_client(ctx, &namespace, policy.spec.gitlab.as_ref()).await?;
    let update = ContainerExpirationPolicyUpdate {
        enabled: Some(false),
        ..Default::default()
    };
    match client.update_cleanup_policy(&project, &update).await {
        Ok(_) => {
            publish(
                ctx,
                policy,
                EventType::Normal,
                "Disabled",
                &format!("disabled the GitLab cleanup policy of {project}"),
            )
            .await
        }
        Err(error) if error.is_not_found() => {}
        Err(error) => return Err(Error::Sync(error.into())),
    }
    Ok(Requeue::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    #[test]
    fn pods_index_every_container_kind_and_image_id() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {
                "containers": [{"name": "app", "image": "registry.example.com/my-org/app:1.2"}],
                "initContainers": [{"name": "init", "image": "registry.example.com/my-org/init:3"}],
                "ephemeralContainers": [{"name": "debug", "image": "registry.example.com/my-org/debug:4"}]
            },
            "status": {"containerStatuses": [{
                "name": "app", "image": "registry.example.com/my-org/app:1.2", "ready": true, "restartCount": 0,
                "imageID": "registry.example.com/my-org/app@sha256:1111111111111111111111111111111111111111111111111111111111111111"
            }]}
        }))
        .expect("pod");
        let images = PodImages::default();
        images.apply(Event::Init);
        images.apply(Event::InitApply(pod));
        images.apply(Event::InitDone);
        let InUse::Known(index) = images.in_use() else {
            panic!("synced after the list");
        };
        assert!(index.is_in_use("registry.example.com/my-org/app", "1.2", None));
        assert!(index.is_in_use("registry.example.com/my-org/init", "3", None));
        assert!(index.is_in_use("registry.example.com/my-org/debug", "4", None));
        let digest = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        assert!(index.is_in_use("registry.example.com/my-org/app", "renamed", Some(digest)));
        assert!(!index.is_in_use("registry.example.com/my-org/app", "1.3", None));
    }

    fn pod(name: &str, image: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "n"},
            "spec": {"containers": [{"name": "app", "image": image}]}
        }))
        .expect("pod")
    }

    fn in_use(images: &PodImages, image: &str) -> Option<bool> {
        match images.in_use() {
            InUse::Known(index) => Some(index.is_in_use(image, "1", None)),
            InUse::Unavailable(_) => None,
        }
    }

    #[test]
    fn the_pod_cache_follows_the_watch_and_a_relist_replaces_it_when_complete() {
        let images = PodImages::default();
        images.apply(Event::Init);
        images.apply(Event::InitApply(pod("a", "r.example.com/a:1")));
        assert_eq!(
            in_use(&images, "r.example.com/a"),
            None,
            "not synced mid-list"
        );
        images.apply(Event::InitDone);
        assert_eq!(in_use(&images, "r.example.com/a"), Some(true));
        images.apply(Event::Apply(pod("b", "r.example.com/b:1")));
        images.apply(Event::Apply(pod("a", "r.example.com/a2:1")));
        assert_eq!(
            in_use(&images, "r.example.com/a"),
            Some(false),
            "a's image changed"
        );
        assert_eq!(in_use(&images, "r.example.com/a2"), Some(true));
        images.apply(Event::Delete(pod("b", "r.example.com/b:1")));
        assert_eq!(in_use(&images, "r.example.com/b"), Some(false));
        // A relist (after a watch error): the last list holds until the new one is complete,
        // then a Pod it no longer has is gone.
        images.apply(Event::Init);
        images.apply(Event::InitApply(pod("c", "r.example.com/c:1")));
        assert_eq!(in_use(&images, "r.example.com/a2"), Some(true));
        assert_eq!(in_use(&images, "r.example.com/c"), Some(false));
        images.apply(Event::InitDone);
        assert_eq!(in_use(&images, "r.example.com/a2"), Some(false));
        assert_eq!(in_use(&images, "r.example.com/c"), Some(true));
    }
}
