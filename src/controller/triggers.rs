//! Which watch events start a reconcile. A status write by the operator itself must not, or
//! every reconcile would cause a second one (and a second round of GitLab reads): the kinds'
//! own streams pass only changes of the spec (generation), of our one-shot annotations, of
//! finalizers and of deletion; the cross-kind streams pass only what the other side reads,
//! the `resolve` facts its reconcile is built from.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::ObjectRef;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::PartialObjectMeta;

use crate::crd::{
    PURGE_CACHE_REQUESTED_AT, RECONCILE_REQUESTED_AT, RUN_REQUESTED_AT, Upstream, VirtualRegistry,
};
use crate::resolve;

/// Passes an object of a shared (subscribed) stream only when `predicate` hashes it
/// differently from the last time that object passed: the shared-stream counterpart of
/// kube's `predicate_filter`.
pub fn changed_only<K>(
    objects: impl Stream<Item = Arc<K>>,
    predicate: fn(&K) -> Option<u64>,
) -> impl Stream<Item = Arc<K>>
where
    K: Resource<DynamicType = ()>,
{
    let mut last: HashMap<ObjectRef<K>, u64> = HashMap::new();
    objects.filter(move |object| {
        let changed = match predicate(object) {
            Some(hash) => last.insert(ObjectRef::from_obj(object.as_ref()), hash) != Some(hash),
            None => true,
        };
        std::future::ready(changed)
    })
}

fn hash_of(value: impl Hash) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    Some(hasher.finish())
}

/// A change the object's own controller must act on.
pub fn spec_or_intent<K: Resource>(object: &K) -> Option<u64> {
    let meta = object.meta();
    let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    hash_of((
        meta.generation,
        annotation(RECONCILE_REQUESTED_AT),
        annotation(PURGE_CACHE_REQUESTED_AT),
        annotation(RUN_REQUESTED_AT),
        &meta.finalizers,
        meta.deletion_timestamp.is_some(),
    ))
}

/// What a registry reads from an Upstream: [`resolve::upstream_facts`], nothing more or less.
pub fn upstream_identity(upstream: &Upstream) -> Option<u64> {
    hash_of(resolve::upstream_facts(upstream))
}

/// A Secret's identity: which version of it exists. A re-list passes no Secret again, only a
/// new version does (a reconcile reads the Secret's data with a GET).
pub fn secret_version(secret: &PartialObjectMeta<Secret>) -> Option<u64> {
    hash_of(&secret.metadata.resource_version)
}

/// The objects (of one kind, from its store) that read `secret`: those of its namespace for
/// which `reads(object, secret name)` holds.
pub fn readers_of<K>(
    objects: &[Arc<K>],
    secret: &PartialObjectMeta<Secret>,
    reads: fn(&K, &str) -> bool,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    objects
        .iter()
        .filter(|object| object.meta().namespace == secret.metadata.namespace)
        .filter(|object| reads(object, name))
        .map(|object| ObjectRef::from_obj(object.as_ref()))
        .collect()
}

/// Whether a registry reads Secret `name` of its namespace: its GitLab token.
pub fn registry_reads(registry: &VirtualRegistry, name: &str) -> bool {
    registry
        .spec
        .gitlab
        .as_ref()
        .is_some_and(|gitlab| gitlab.token_secret_ref.name == name)
}

/// Whether an Upstream reads Secret `name` of its namespace: its credentials or GitLab token.
pub fn upstream_reads(upstream: &Upstream, name: &str) -> bool {
    upstream
        .spec
        .credentials_secret_ref
        .as_ref()
        .is_some_and(|credentials| credentials.name == name)
        || upstream
            .spec
            .gitlab
            .as_ref()
            .is_some_and(|gitlab| gitlab.token_secret_ref.name == name)
}

/// Strips a watched Secret's metadata to what the triggers read (namespace, name, version):
/// labels, annotations (a `kubectl apply` annotation holds the whole Secret) and managed
/// fields are not kept in the store.
pub fn keep_only_identity(secret: &mut PartialObjectMeta<Secret>) {
    let meta = &mut secret.metadata;
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        resource_version: meta.resource_version.take(),
        uid: meta.uid.take(),
        ..ObjectMeta::default()
    };
}

/// What an Upstream reads from a registry: [`resolve::registry_facts`], nothing more or less.
pub fn registry_identity(registry: &VirtualRegistry) -> Option<u64> {
    hash_of(resolve::registry_facts(registry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::upstream::UpstreamStatus;

    fn upstream() -> Upstream {
        serde_saphyr::from_str(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: u, namespace: n, generation: 1}\nspec: {group: g, url: 'https://quay.io'}\n",
        )
        .expect("valid")
    }

    #[test]
    fn status_writes_do_not_trigger_but_spec_and_intent_do() {
        let base = upstream();
        let mut status_only = base.clone();
        status_only.status = Some(UpstreamStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        assert_eq!(spec_or_intent(&base), spec_or_intent(&status_only));

        let mut edited = base.clone();
        edited.metadata.generation = Some(2);
        assert_ne!(spec_or_intent(&base), spec_or_intent(&edited));

        let mut requested = base.clone();
        requested.metadata.annotations =
            Some([(PURGE_CACHE_REQUESTED_AT.to_string(), "now".to_string())].into());
        assert_ne!(spec_or_intent(&base), spec_or_intent(&requested));

        let mut finalized = base.clone();
        finalized.metadata.finalizers = Some(vec![crate::crd::FINALIZER.into()]);
        assert_ne!(spec_or_intent(&base), spec_or_intent(&finalized));
    }

    #[tokio::test]
    async fn shared_streams_pass_an_object_again_only_when_it_changed() {
        let base = upstream();
        let mut created = base.clone();
        created.status = Some(UpstreamStatus {
            upstream_id: Some(7),
            ..Default::default()
        });
        let mut checked = created.clone();
        checked
            .status
            .as_mut()
            .expect("status")
            .last_handled_reconcile_at = Some("x".into());
        let passed: Vec<_> = changed_only(
            futures::stream::iter([base, created.clone(), checked, created].map(Arc::new)),
            upstream_identity,
        )
        .collect()
        .await;
        assert_eq!(passed.len(), 2, "the first sighting and the new id only");
    }

    fn secret(version: &str) -> PartialObjectMeta<Secret> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "sh.helm.release.v1.app.v1", "namespace": "n", "resourceVersion": version,
                "uid": "u-1", "labels": {"owner": "helm"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\": \"…\"}"},
                "managedFields": [{"manager": "helm", "operation": "Update"}],
            },
        }))
        .expect("valid metadata")
    }

    #[tokio::test]
    async fn secrets_pass_once_per_version_stripped_to_their_identity() {
        let mut stripped = secret("1");
        keep_only_identity(&mut stripped);
        assert_eq!(
            stripped.metadata.name.as_deref(),
            Some("sh.helm.release.v1.app.v1")
        );
        assert_eq!(stripped.metadata.namespace.as_deref(), Some("n"));
        assert_eq!(stripped.metadata.resource_version.as_deref(), Some("1"));
        assert!(stripped.metadata.annotations.is_none());
        assert!(stripped.metadata.labels.is_none());
        assert!(stripped.metadata.managed_fields.is_none());

        let relisted = [secret("1"), secret("1"), secret("2")].map(Arc::new);
        let passed: Vec<_> = changed_only(futures::stream::iter(relisted), secret_version)
            .collect()
            .await;
        assert_eq!(
            passed.len(),
            2,
            "the first sighting and the new version only"
        );
    }

    #[test]
    fn a_secret_requeues_the_objects_of_its_namespace_that_read_it() {
        let mut reading = upstream();
        reading.spec.credentials_secret_ref = Some(
            serde_json::from_value(serde_json::json!({"name": "sh.helm.release.v1.app.v1"}))
                .expect("reference"),
        );
        let mut elsewhere = reading.clone();
        elsewhere.metadata.namespace = Some("other".into());
        let mut not_reading = upstream();
        not_reading.metadata.name = Some("plain".into());
        let objects = [reading.clone(), elsewhere, not_reading].map(Arc::new);
        let requeued = readers_of(&objects, &secret("1"), upstream_reads);
        assert_eq!(requeued, [ObjectRef::from_obj(&reading)]);
    }

    #[test]
    fn registries_only_hear_about_upstream_ids() {
        let base = upstream();
        let mut checked = base.clone();
        checked.status = Some(UpstreamStatus {
            last_handled_reconcile_at: Some("x".into()),
            ..Default::default()
        });
        assert_eq!(upstream_identity(&base), upstream_identity(&checked));
        let mut created = base.clone();
        created.status = Some(UpstreamStatus {
            upstream_id: Some(7),
            ..Default::default()
        });
        assert_ne!(upstream_identity(&base), upstream_identity(&created));
    }

    fn not_synced(reason: &str) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        let mut conditions = Vec::new();
        crate::crd::conditions::set_condition(
            &mut conditions,
            crate::crd::conditions::ConditionUpdate::new(
                crate::crd::conditions::SYNCED,
                false,
                reason,
                reason,
            ),
            Some(1),
            &crate::controller::status::now(),
        );
        conditions
    }

    #[test]
    fn an_upstream_blocked_without_an_id_requeues_its_registries() {
        let base = upstream();
        let mut waiting = base.clone();
        waiting.status = Some(UpstreamStatus {
            conditions: not_synced("WaitingForRegistry"),
            ..Default::default()
        });
        assert_eq!(
            upstream_identity(&base),
            upstream_identity(&waiting),
            "still on its way to an id"
        );
        let mut failed = base.clone();
        failed.status = Some(UpstreamStatus {
            conditions: not_synced("ConnectivityTestFailed"),
            ..Default::default()
        });
        assert_ne!(upstream_identity(&base), upstream_identity(&failed));
        let mut suspended = base.clone();
        suspended.spec.suspend = true;
        assert_ne!(upstream_identity(&base), upstream_identity(&suspended));
    }

    fn registry() -> VirtualRegistry {
        serde_saphyr::from_str(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {name: r, namespace: n, generation: 1}\nspec: {group: g, upstreams: [{name: u}]}\n",
        )
        .expect("valid")
    }

    #[test]
    fn a_registry_failing_before_it_has_an_id_requeues_its_upstreams() {
        let base = registry();
        let mut failed = base.clone();
        failed.status = Some(crate::crd::VirtualRegistryStatus {
            conditions: not_synced("LimitExceeded"),
            ..Default::default()
        });
        assert_ne!(registry_identity(&base), registry_identity(&failed));
        let mut suspended = base.clone();
        suspended.spec.suspend = true;
        assert_ne!(registry_identity(&base), registry_identity(&suspended));
        let mut checked = base.clone();
        checked.status = Some(crate::crd::VirtualRegistryStatus {
            last_handled_reconcile_at: Some("x".into()),
            ..Default::default()
        });
        assert_eq!(registry_identity(&base), registry_identity(&checked));
    }
}
