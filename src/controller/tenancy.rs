//! Glue of the tenancy rules (`crate::tenancy`): the access policy file, re-read when it
//! changes; the checks every reconcile makes before any GitLab call (access, then
//! ownership); and the triggers that reconcile the objects a change concerns — a policy
//! change the objects whose verdict changed, an object's deletion or new claims the objects
//! waiting in `Conflict`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use url::Url;

use super::{Context, Error, Result};
use crate::crd::{CleanupPolicy, Upstream, VirtualRegistry};
use crate::tenancy::access::{self, AccessPolicy, Target};
use crate::tenancy::claims;
use crate::tenancy::ownership::{Claim, Contender, owned_elsewhere};

/// How often `run` looks at the policy file besides the reads of reconciles: a mounted
/// ConfigMap changes without any Kubernetes event reaching the operator.
pub const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// The `--access-policy` file and the policy last read from it. A change of the file is
/// used from the next read on; a file that no longer parses keeps the last good policy (and
/// says so in the log), so a typo does not open or close everything at once.
#[derive(Debug)]
pub struct AccessPolicyFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    text: String,
    policy: Arc<AccessPolicy>,
}

impl AccessPolicyFile {
    /// Reads and parses the file; a missing or malformed file is an error at start-up.
    pub fn load(path: &Path) -> Result<Self, access::Error> {
        let text = read(path)?;
        let policy = AccessPolicy::parse(&path.display().to_string(), &text)?;
        Ok(Self {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                text,
                policy: Arc::new(policy),
            }),
        })
    }

    /// The policy now in force, re-read first.
    pub fn current(&self) -> Arc<AccessPolicy> {
        self.refresh();
        self.lock().policy.clone()
    }

    /// Re-reads the file; when its policy changed, the policies before and after.
    pub fn refresh(&self) -> Option<(Arc<AccessPolicy>, Arc<AccessPolicy>)> {
        let text = match read(&self.path) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, "keeping the access policy last read");
                return None;
            }
        };
        let mut loaded = self.lock();
        if loaded.text == text {
            return None;
        }
        let parsed = AccessPolicy::parse(&self.path.display().to_string(), &text);
        loaded.text = text;
        match parsed {
            Ok(policy) if policy != *loaded.policy => {
                tracing::info!(file = %self.path.display(), "access policy changed");
                let before = std::mem::replace(&mut loaded.policy, Arc::new(policy));
                Some((before, loaded.policy.clone()))
            }
            Ok(_) => None,
            Err(error) => {
                tracing::error!(%error, "keeping the access policy last read");
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn read(path: &Path) -> Result<String, access::Error> {
    std::fs::read_to_string(path).map_err(|error| access::Error::Unreadable {
        source_name: path.display().to_string(),
        message: error.to_string(),
    })
}

/// `NotPermitted` unless the operator runs without a policy or the policy lets `namespace`
/// reach every target.
pub fn check_access(ctx: &Context, namespace: &str, targets: &[Target]) -> Result<()> {
    let Some(file) = &ctx.config.access_policy else {
        return Ok(());
    };
    file.current()
        .check(namespace, targets)
        .map_err(Error::NotPermitted)
}

/// `Conflict` when an older contender of the store holds one of `me`'s claims.
fn check_owner(
    me: &Contender<String>,
    store: impl IntoIterator<Item = Contender<String>>,
) -> Result<()> {
    let others: Vec<Contender<String>> = store.into_iter().collect();
    match owned_elsewhere(me, &others) {
        None => Ok(()),
        Some(elsewhere) => Err(Error::Conflict {
            owner: elsewhere.owner.clone(),
            object: elsewhere.claim.to_string(),
        }),
    }
}

fn default_url(ctx: &Context) -> Option<&Url> {
    ctx.config
        .default_gitlab
        .as_ref()
        .map(|default| &default.url)
}

/// For a group cleanup with the operator's connection, once its group passed: every project
/// the group expands to must be permitted too (one listing of the group's repositories).
pub async fn check_group_expansion(
    ctx: &Context,
    policy: &CleanupPolicy,
    client: &crate::gitlab::GitLabClient,
    group: &crate::gitlab::PathOrId,
) -> Result<()> {
    let (Some(file), None) = (&ctx.config.access_policy, &policy.spec.gitlab) else {
        return Ok(());
    };
    let repositories = client
        .list_group_repositories_all(group)
        .await
        .map_err(|error| Error::Sync(error.into()))?;
    file.current()
        .check_expansion(
            &policy.namespace().unwrap_or_default(),
            repositories
                .iter()
                .map(|r| (r.path.as_str(), r.name.as_str())),
        )
        .map_err(Error::NotPermitted)
}

/// Access and ownership of a registry, before any GitLab call.
pub fn check_registry(ctx: &Context, registry: &VirtualRegistry) -> Result<()> {
    let namespace = registry.namespace().unwrap_or_default();
    check_access(ctx, &namespace, &claims::registry_targets(registry))?;
    let default = default_url(ctx);
    check_owner(
        &claims::registry_contender(registry, default),
        ctx.registries
            .state()
            .iter()
            .map(|other| claims::registry_contender(other, default)),
    )
}

/// Access and ownership of an Upstream, before any GitLab call.
pub fn check_upstream(ctx: &Context, upstream: &Upstream) -> Result<()> {
    let namespace = upstream.namespace().unwrap_or_default();
    check_access(ctx, &namespace, &claims::upstream_targets(upstream))?;
    let default = default_url(ctx);
    check_owner(
        &claims::upstream_contender(upstream, default),
        ctx.upstreams
            .state()
            .iter()
            .map(|other| claims::upstream_contender(other, default)),
    )
}

/// Access and ownership of a CleanupPolicy, before any GitLab call.
pub fn check_policy(ctx: &Context, policy: &CleanupPolicy) -> Result<()> {
    let namespace = policy.namespace().unwrap_or_default();
    let upstreams = ctx.upstreams.state();
    let targets = claims::policy_targets(policy, upstreams.iter().map(|u| u.as_ref()));
    check_access(ctx, &namespace, &targets)?;
    let default = default_url(ctx);
    let others = ctx
        .policies
        .as_ref()
        .map(|store| store.state())
        .unwrap_or_default();
    check_owner(
        &claims::policy_contender(policy, default),
        others
            .iter()
            .map(|other| claims::policy_contender(other, default)),
    )
}

/// Whether a deletion may touch GitLab: only an object that may reach its target and owns
/// what it claims (a non-owner's finalizer deletes and disassociates nothing).
pub fn may_clean_up_in_gitlab(check: Result<()>, kind: &str, object: &str) -> bool {
    match check {
        Ok(()) => true,
        Err(error) => {
            tracing::info!(kind, object, reason = error.reason(), %error, "deleted without touching GitLab");
            false
        }
    }
}

/// The kinds' view for the triggers: what they claim.
pub trait Tenant: Resource<DynamicType = ()> + Clone + Send + Sync + 'static {
    fn contender(&self, default: Option<&Url>) -> Contender<String>;
}

impl Tenant for VirtualRegistry {
    fn contender(&self, default: Option<&Url>) -> Contender<String> {
        claims::registry_contender(self, default)
    }
}

impl Tenant for Upstream {
    fn contender(&self, default: Option<&Url>) -> Contender<String> {
        claims::upstream_contender(self, default)
    }
}

impl Tenant for CleanupPolicy {
    fn contender(&self, default: Option<&Url>) -> Contender<String> {
        claims::policy_contender(self, default)
    }
}

/// Watches one kind's events (after its reflector applied them) and, when an object is
/// deleted or its claims change, sends the other objects claiming what it claimed or claims
/// now: an owner gone or moved hands over to the next contender, and an object that newly
/// claims a GitLab object another manages makes them meet, both at the reconcile this starts
/// instead of the next resync.
pub struct HandoverObserver<K: Tenant> {
    store: Store<K>,
    default: Option<Url>,
    claims: HashMap<ObjectRef<K>, Vec<Claim>>,
    sender: UnboundedSender<ObjectRef<K>>,
}

impl<K: Tenant> HandoverObserver<K> {
    pub fn new(
        store: Store<K>,
        default: Option<Url>,
        sender: UnboundedSender<ObjectRef<K>>,
    ) -> Self {
        Self {
            store,
            default,
            claims: HashMap::new(),
            sender,
        }
    }

    /// The observer as the closure a watch stream's `inspect_ok` takes.
    pub fn into_fn(mut self) -> impl FnMut(&watcher::Event<K>) {
        move |event| self.observe(event)
    }

    pub fn observe(&mut self, event: &watcher::Event<K>) {
        let default = self.default.as_ref();
        let (changed, moved): (ObjectRef<K>, Vec<Claim>) = match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                let key = ObjectRef::from_obj(object);
                let claims = object.contender(default).claims;
                match self.claims.insert(key.clone(), claims.clone()) {
                    Some(previous) if previous != claims => {
                        (key, previous.into_iter().chain(claims).collect())
                    }
                    // First sight (a new object is the youngest: its own reconcile decides),
                    // or nothing moved.
                    _ => return,
                }
            }
            watcher::Event::Delete(object) => {
                let key = ObjectRef::from_obj(object);
                let claims = self
                    .claims
                    .remove(&key)
                    .unwrap_or_else(|| object.contender(default).claims);
                (key, claims)
            }
            watcher::Event::Init | watcher::Event::InitDone => return,
        };
        if moved.is_empty() {
            return;
        }
        for contender in self.store.state().iter() {
            let key = ObjectRef::from_obj(contender.as_ref());
            let contends = contender
                .contender(default)
                .claims
                .iter()
                .any(|claim| moved.contains(claim));
            if key != changed && contends {
                // A closed channel means the controller stopped: nothing left to trigger.
                let _ = self.sender.unbounded_send(key);
            }
        }
    }
}

/// A trigger channel per kind, fed by the handover observers and the policy watch.
pub struct Triggers<K: Resource<DynamicType = ()>> {
    pub sender: UnboundedSender<ObjectRef<K>>,
    pub receiver: UnboundedReceiver<ObjectRef<K>>,
}

impl<K: Resource<DynamicType = ()>> Triggers<K> {
    pub fn new() -> Self {
        let (sender, receiver) = unbounded();
        Self { sender, receiver }
    }
}

impl<K: Resource<DynamicType = ()>> Default for Triggers<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// The objects of `objects` whose verdict differs between `before` and `after`. Pure.
pub fn verdict_changed<'a, K: Resource<DynamicType = ()> + 'a>(
    before: &AccessPolicy,
    after: &AccessPolicy,
    objects: impl IntoIterator<Item = &'a K>,
    targets: impl Fn(&K) -> Vec<Target>,
) -> Vec<ObjectRef<K>> {
    objects
        .into_iter()
        .filter(|object| {
            let namespace = object.meta().namespace.clone().unwrap_or_default();
            let targets = targets(object);
            before.check(&namespace, &targets).is_ok() != after.check(&namespace, &targets).is_ok()
        })
        .map(|object| ObjectRef::from_obj(object))
        .collect()
}

/// Senders of the three controllers' trigger channels.
pub struct TriggerSenders {
    pub registries: UnboundedSender<ObjectRef<VirtualRegistry>>,
    pub upstreams: UnboundedSender<ObjectRef<Upstream>>,
    pub policies: UnboundedSender<ObjectRef<CleanupPolicy>>,
}

/// Polls the policy file; on a change, reconciles the objects whose verdict changed.
pub async fn watch_access_policy(ctx: Arc<Context>, senders: TriggerSenders) {
    let Some(file) = ctx.config.access_policy.clone() else {
        return;
    };
    let mut interval = tokio::time::interval(POLICY_POLL_INTERVAL);
    // Compared with the policy of the last tick, not with what `refresh` reports: a
    // reconcile's read may have been the one to see the change first.
    let mut before = file.current();
    loop {
        interval.tick().await;
        let after = file.current();
        if after == before {
            continue;
        }
        let registries = ctx.registries.state();
        let upstreams = ctx.upstreams.state();
        let policies = ctx.policies.as_ref().map(Store::state).unwrap_or_default();
        let sends = verdict_changed(
            &before,
            &after,
            registries.iter().map(|r| r.as_ref()),
            claims::registry_targets,
        )
        .into_iter()
        .map(|object| senders.registries.unbounded_send(object).is_ok())
        .chain(
            verdict_changed(
                &before,
                &after,
                upstreams.iter().map(|u| u.as_ref()),
                claims::upstream_targets,
            )
            .into_iter()
            .map(|object| senders.upstreams.unbounded_send(object).is_ok()),
        )
        .chain(
            verdict_changed(
                &before,
                &after,
                policies.iter().map(|p| p.as_ref()),
                |policy| claims::policy_targets(policy, upstreams.iter().map(|u| u.as_ref())),
            )
            .into_iter()
            .map(|object| senders.policies.unbounded_send(object).is_ok()),
        )
        .filter(|sent| *sent)
        .count();
        tracing::info!(
            objects = sends,
            "access policy changed: reconciling the objects it concerns"
        );
        before = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(namespace: &str, group: &str) -> VirtualRegistry {
        serde_saphyr::from_str(&format!(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {{name: cache, namespace: {namespace}}}\nspec: {{group: {group}}}\n"
        ))
        .expect("registry")
    }

    #[test]
    fn a_policy_change_concerns_the_objects_whose_verdict_changes() {
        let before = AccessPolicy::parse("p", "rules: [{namespaces: [a], groups: [org-a]}]")
            .expect("policy");
        let after =
            AccessPolicy::parse("p", "rules: [{namespaces: [a, b], groups: [org-a, org-b]}]")
                .expect("policy");
        let objects = [
            registry("a", "org-a"),
            registry("b", "org-b"),
            registry("c", "org-c"),
        ];
        let changed = verdict_changed(&before, &after, objects.iter(), claims::registry_targets);
        assert_eq!(changed, vec![ObjectRef::new("cache").within("b")]);
    }

    #[test]
    fn the_policy_file_is_re_read_when_it_changes_and_a_broken_one_is_not_used() {
        let dir = std::env::temp_dir().join(format!("access-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "rules: [{namespaces: [a], groups: [org-a]}]").expect("write");
        let file = AccessPolicyFile::load(&path).expect("loads");
        let target = [Target::Group("org-b".into())];
        assert!(file.current().check("a", &target).is_err());
        assert!(file.refresh().is_none(), "unchanged");
        std::fs::write(&path, "rules: [{namespaces: [a], groups: [org-a, org-b]}]").expect("write");
        assert!(file.refresh().is_some());
        assert!(file.current().check("a", &target).is_ok());
        std::fs::write(&path, "rules: [{namespaces: [a], grups: []}]").expect("write");
        assert!(file.refresh().is_none());
        assert!(
            file.current().check("a", &target).is_ok(),
            "the last good policy stays"
        );
        std::fs::remove_dir_all(&dir).expect("cleaned up");
        assert!(AccessPolicyFile::load(&path).is_err());
    }
}
