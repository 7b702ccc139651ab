//! The tenancy rules for `apply`/`plan`: manifests that claim one GitLab object twice are an
//! error naming both files, and objects outside `--access-policy` are reported
//! `NotPermitted` and sent nowhere (they leave the set the engines see).

use kube::ResourceExt;
use url::Url;

use super::manifests::{Manifest, ManifestError, ManifestErrors, Manifests};
use super::run::ObjectReport;
use crate::crd::reasons;
use crate::gitlab::{GitLabClient, PathOrId};
use crate::tenancy::claims;
use crate::tenancy::ownership::{Contender, duplicate_claims};
use crate::tenancy::{AccessPolicy, Denial, Target};

/// One error per GitLab object that two manifests claim, naming both.
pub fn check_claims(manifests: &Manifests, gitlab: &Url) -> Result<(), ManifestErrors> {
    let mut errors = Vec::new();
    let default = Some(gitlab);
    duplicates(
        "VirtualRegistry",
        &manifests.registries,
        |r| claims::registry_contender(r, default),
        &mut errors,
    );
    duplicates(
        "Upstream",
        &manifests.upstreams,
        |u| claims::upstream_contender(u, default),
        &mut errors,
    );
    duplicates(
        "CleanupPolicy",
        &manifests.cleanup_policies,
        |p| claims::policy_contender(p, default),
        &mut errors,
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ManifestErrors(errors))
    }
}

fn duplicates<K: ResourceExt>(
    kind: &str,
    items: &[Manifest<K>],
    contender: impl Fn(&K) -> Contender<String>,
    errors: &mut Vec<ManifestError>,
) {
    let contenders: Vec<Contender<usize>> = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let Contender {
                created, claims, ..
            } = contender(&item.object);
            Contender {
                id: index,
                created,
                claims,
            }
        })
        .collect();
    for (claim, first, second) in duplicate_claims(&contenders) {
        let (first, second) = (&items[*first], &items[*second]);
        errors.push(ManifestError {
            origin: second.source.clone(),
            kind: kind.into(),
            name: manifest_id(&second.object),
            field: "spec".into(),
            message: format!(
                "claims {claim}, which {} (in {}) already claims: one GitLab object has one owner",
                manifest_id(&first.object),
                first.source
            ),
        });
    }
}

/// Takes the objects the policy refuses out of `manifests`, with their reports.
pub fn withhold_not_permitted(
    manifests: &mut Manifests,
    policy: &AccessPolicy,
) -> Vec<ObjectReport> {
    let mut reports = Vec::new();
    let upstreams: Vec<_> = manifests
        .upstreams
        .iter()
        .map(|u| u.object.clone())
        .collect();
    withhold(
        "VirtualRegistry",
        &mut manifests.registries,
        policy,
        claims::registry_targets,
        &mut reports,
    );
    withhold(
        "Upstream",
        &mut manifests.upstreams,
        policy,
        claims::upstream_targets,
        &mut reports,
    );
    withhold(
        "CleanupPolicy",
        &mut manifests.cleanup_policies,
        policy,
        |p| claims::policy_targets(p, &upstreams),
        &mut reports,
    );
    reports
}

/// Takes out the group cleanups whose group expands to a project the policy refuses (one
/// listing per group cleanup the policy let through), with their reports. A listing that
/// fails is left to the run, which reports it.
pub async fn withhold_group_expansions(
    client: &GitLabClient,
    manifests: &mut Manifests,
    policy: &AccessPolicy,
) -> Vec<ObjectReport> {
    let mut denials = Vec::new();
    for (index, item) in manifests.cleanup_policies.iter().enumerate() {
        let group = item
            .object
            .spec
            .target
            .container_repositories
            .as_ref()
            .and_then(|target| target.group.as_deref());
        let (Some(group), None) = (group, &item.object.spec.gitlab) else {
            continue;
        };
        let Ok(repositories) = client
            .list_group_repositories_all(&PathOrId::parse(group))
            .await
        else {
            continue;
        };
        let namespace = namespace_of(&item.object);
        if let Err(denial) = policy.check_expansion(
            &namespace,
            repositories
                .iter()
                .map(|r| (r.path.as_str(), r.name.as_str())),
        ) {
            denials.push((index, denial));
        }
    }
    let mut reports = Vec::new();
    for (index, denial) in denials.into_iter().rev() {
        let item = manifests.cleanup_policies.remove(index);
        reports.push(not_permitted("CleanupPolicy", &item, &denial));
    }
    reports.reverse();
    reports
}

/// `namespace/name` of a manifest, its namespace `default` when it names none.
fn manifest_id<K: ResourceExt>(object: &K) -> String {
    format!("{}/{}", namespace_of(object), object.name_any())
}

fn namespace_of<K: ResourceExt>(object: &K) -> String {
    // As the other standalone code: a manifest without a namespace is in `default`.
    object.namespace().unwrap_or_else(|| "default".into())
}

fn not_permitted<K: ResourceExt>(kind: &str, item: &Manifest<K>, denial: &Denial) -> ObjectReport {
    let mut report = ObjectReport::new(
        kind,
        namespace_of(&item.object),
        item.object.name_any(),
        &item.source,
    );
    report.not_synced(
        reasons::NOT_PERMITTED,
        denial.to_string(),
        // Nothing was sent, so nothing is known of GitLab: the plan and the apply say the same.
        crate::sync::Mode::Plan,
        false,
    );
    report
}

fn withhold<K: ResourceExt>(
    kind: &str,
    items: &mut Vec<Manifest<K>>,
    policy: &AccessPolicy,
    targets: impl Fn(&K) -> Vec<Target>,
    reports: &mut Vec<ObjectReport>,
) {
    items.retain(
        |item| match policy.check(&namespace_of(&item.object), &targets(&item.object)) {
            Ok(()) => true,
            Err(denial) => {
                reports.push(not_permitted(kind, item, &denial));
                false
            }
        },
    );
}
