//! What an object of each kind reaches in GitLab: the access policy's targets (nothing for
//! an object with its own `spec.gitlab`: GitLab's permissions for that token apply) and the
//! GitLab objects it claims for ownership. Pure functions of the objects.

use kube::ResourceExt;
use url::Url;

use super::access::Target;
use super::ownership::{Claim, Contender, GitLabObject};
use crate::crd::{CleanupPolicy, CleanupStrategy, GitLabConnection, Upstream, VirtualRegistry};
use crate::gitlab::PathOrId;

/// The GitLab an object talks to, normalised (`https://gitlab.example.com`): its
/// `spec.gitlab.url`, else the operator's default; `None` when it has neither.
pub fn gitlab_of(connection: Option<&GitLabConnection>, default: Option<&Url>) -> Option<String> {
    let url = match connection {
        Some(connection) => Url::parse(&connection.url).ok()?,
        None => default?.clone(),
    };
    Some(url.as_str().trim_end_matches('/').to_owned())
}

/// A group as the claims compare it: lower-cased path, or `id:N`.
fn group_key(group: &PathOrId) -> String {
    match group {
        PathOrId::Id(id) => format!("id:{id}"),
        PathOrId::Path(path) => path.to_lowercase(),
    }
}

/// The groups and projects a registry reaches through the operator's connection.
pub fn registry_targets(registry: &VirtualRegistry) -> Vec<Target> {
    if registry.spec.gitlab.is_some() {
        return Vec::new();
    }
    vec![Target::Group(PathOrId::parse(&registry.spec.group))]
}

/// The groups an Upstream reaches through the operator's connection.
pub fn upstream_targets(upstream: &Upstream) -> Vec<Target> {
    if upstream.spec.gitlab.is_some() {
        return Vec::new();
    }
    vec![Target::Group(PathOrId::parse(&upstream.spec.group))]
}

/// What a CleanupPolicy reaches through the operator's connection: its project, the projects
/// of its group, or the group of the Upstream (in its namespace) whose cache it cleans. An
/// upstream cache whose Upstream is not there reaches nothing (the run stops before any
/// request).
pub fn policy_targets<'a>(
    policy: &CleanupPolicy,
    upstreams: impl IntoIterator<Item = &'a Upstream>,
) -> Vec<Target> {
    if policy.spec.gitlab.is_some() {
        return Vec::new();
    }
    let target = &policy.spec.target;
    let mut targets = Vec::new();
    if let Some(repositories) = &target.container_repositories {
        if let Some(project) = &repositories.project {
            targets.push(Target::Project(PathOrId::parse(project)));
        }
        if let Some(group) = &repositories.group {
            targets.push(Target::GroupProjects(PathOrId::parse(group)));
        }
    }
    if let Some(cache) = &target.upstream_cache {
        let namespace = policy.namespace();
        if let Some(upstream) = upstreams
            .into_iter()
            .find(|u| u.namespace() == namespace && u.name_any() == cache.upstream_ref.name)
        {
            targets.push(Target::Group(PathOrId::parse(&upstream.spec.group)));
        }
    }
    targets
}

fn created<K: ResourceExt>(object: &K) -> Option<jiff::Timestamp> {
    object.meta().creation_timestamp.as_ref().map(|time| time.0)
}

/// `namespace/name`, as conflicts name the owner.
pub fn object_id<K: ResourceExt>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The claims of an object on `gitlab` (none without one): the object by its spec's group
/// and, once known, by the group's id, plus its own id once it has one.
fn claims_on(
    gitlab: Option<String>,
    group: &str,
    group_id: Option<i64>,
    in_group: impl Fn(String) -> GitLabObject,
    by_id: Option<GitLabObject>,
) -> Vec<Claim> {
    let Some(gitlab) = gitlab else {
        return Vec::new();
    };
    let groups = std::iter::once(group_key(&PathOrId::parse(group)))
        .chain(group_id.map(|id| group_key(&PathOrId::Id(id))));
    groups
        .map(in_group)
        .chain(by_id)
        .map(|object| Claim {
            gitlab: gitlab.clone(),
            object,
        })
        .collect()
}

/// The registry a VirtualRegistry manages: by group and name (the group's id too once
/// known), and by id once it has one.
pub fn registry_contender(registry: &VirtualRegistry, default: Option<&Url>) -> Contender<String> {
    let status = registry.status.as_ref();
    let name = registry.gitlab_name();
    Contender {
        id: object_id(registry),
        created: created(registry),
        claims: claims_on(
            gitlab_of(registry.spec.gitlab.as_ref(), default),
            &registry.spec.group,
            status.and_then(|s| s.group_id),
            |group| GitLabObject::Registry {
                group,
                name: name.clone(),
            },
            status
                .and_then(|s| s.registry_id)
                .map(GitLabObject::RegistryId),
        ),
    }
}

/// The upstream an Upstream manages: by group, name and url (the group's id too once
/// known), and by id once it has one.
pub fn upstream_contender(upstream: &Upstream, default: Option<&Url>) -> Contender<String> {
    let status = upstream.status.as_ref();
    let name = upstream.gitlab_name();
    Contender {
        id: object_id(upstream),
        created: created(upstream),
        claims: claims_on(
            gitlab_of(upstream.spec.gitlab.as_ref(), default),
            &upstream.spec.group,
            status.and_then(|s| s.group_id),
            |group| GitLabObject::Upstream {
                group,
                name: name.clone(),
                url: upstream.spec.url.clone(),
            },
            status
                .and_then(|s| s.upstream_id)
                .map(GitLabObject::UpstreamId),
        ),
    }
}

/// A `GitLabPolicy` CleanupPolicy manages its project's GitLab cleanup policy; the
/// operator's own runs claim nothing (two runs over one project only delete what both
/// rules let go).
pub fn policy_contender(policy: &CleanupPolicy, default: Option<&Url>) -> Contender<String> {
    let project = policy
        .spec
        .target
        .container_repositories
        .as_ref()
        .and_then(|target| target.project.as_deref());
    let claims = match (
        policy.spec.strategy,
        project,
        gitlab_of(policy.spec.gitlab.as_ref(), default),
    ) {
        (CleanupStrategy::GitLabPolicy, Some(project), Some(gitlab)) => vec![Claim {
            gitlab,
            object: GitLabObject::ProjectCleanupPolicy {
                project: group_key(&PathOrId::parse(project)),
            },
        }],
        _ => Vec::new(),
    };
    Contender {
        id: object_id(policy),
        created: created(policy),
        claims,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::ownership::owned_elsewhere;

    fn registry(namespace: &str, group: &str, created: &str) -> VirtualRegistry {
        serde_saphyr::from_str(&format!(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {{name: cache, namespace: {namespace}, creationTimestamp: '{created}'}}\nspec: {{group: {group}}}\n"
        ))
        .expect("registry")
    }

    fn default() -> Url {
        Url::parse("https://GitLab.example.com/").expect("url")
    }

    #[test]
    fn registries_of_one_group_and_name_conflict_whatever_the_case_of_the_group() {
        let old = registry("team-b", "My-Org", "2026-01-01T00:00:00Z");
        let young = registry("team-a", "my-org", "2026-02-01T00:00:00Z");
        let all = [
            registry_contender(&old, Some(&default())),
            registry_contender(&young, Some(&default())),
        ];
        assert_eq!(all[0].claims[0].gitlab, "https://gitlab.example.com");
        let elsewhere = owned_elsewhere(&all[1], &all).expect("conflict");
        assert_eq!(elsewhere.owner, "team-b/cache");
        assert_eq!(owned_elsewhere(&all[0], &all), None);
    }

    #[test]
    fn a_numeric_group_meets_a_path_once_the_group_id_is_known() {
        let mut by_path = registry("team-b", "my-org", "2026-01-01T00:00:00Z");
        let by_id = registry("team-a", "100", "2026-02-01T00:00:00Z");
        let contenders = |by_path: &VirtualRegistry| {
            [
                registry_contender(by_path, Some(&default())),
                registry_contender(&by_id, Some(&default())),
            ]
        };
        assert_eq!(
            owned_elsewhere(&contenders(&by_path)[1], &contenders(&by_path)),
            None
        );
        by_path.status = Some(crate::crd::VirtualRegistryStatus {
            group_id: Some(100),
            ..Default::default()
        });
        let all = contenders(&by_path);
        assert!(owned_elsewhere(&all[1], &all).is_some());
    }

    #[test]
    fn an_own_connection_is_outside_the_policy_and_another_gitlab_is_another_object() {
        let mut own = registry("team-a", "my-org", "2026-02-01T00:00:00Z");
        own.spec.gitlab = Some(GitLabConnection {
            url: "https://other.example.com".into(),
            token_secret_ref: crate::crd::SecretKeyReference {
                name: "token".into(),
                key: "token".into(),
            },
        });
        assert!(registry_targets(&own).is_empty());
        let shared = registry("team-b", "my-org", "2026-01-01T00:00:00Z");
        let all = [
            registry_contender(&shared, Some(&default())),
            registry_contender(&own, Some(&default())),
        ];
        assert_eq!(owned_elsewhere(&all[1], &all), None);
        assert_eq!(
            registry_targets(&shared),
            vec![Target::Group(PathOrId::parse("my-org"))]
        );
    }

    #[test]
    fn upstreams_conflict_by_group_name_and_url_or_by_id() {
        let upstream = |namespace: &str, url: &str, id: Option<i64>| -> Upstream {
            let mut upstream: Upstream = serde_saphyr::from_str(&format!(
                "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {{name: hub, namespace: {namespace}}}\nspec: {{group: my-org, url: '{url}'}}\n"
            ))
            .expect("upstream");
            upstream.status = id.map(|id| crate::crd::UpstreamStatus {
                upstream_id: Some(id),
                ..Default::default()
            });
            upstream
        };
        let contenders = |a: &Upstream, b: &Upstream| {
            [
                upstream_contender(a, Some(&default())),
                upstream_contender(b, Some(&default())),
            ]
        };
        let hub = "https://registry-1.docker.io";
        let same = contenders(&upstream("a", hub, None), &upstream("b", hub, None));
        assert!(
            owned_elsewhere(&same[1], &same).is_some(),
            "same group, name and url"
        );
        let other_url = contenders(
            &upstream("a", hub, None),
            &upstream("b", "https://quay.io", None),
        );
        assert_eq!(
            owned_elsewhere(&other_url[1], &other_url),
            None,
            "names are not unique in GitLab"
        );
        let same_id = contenders(
            &upstream("a", hub, Some(7)),
            &upstream("b", "https://quay.io", Some(7)),
        );
        assert!(
            owned_elsewhere(&same_id[1], &same_id).is_some(),
            "one upstream id"
        );
    }

    #[test]
    fn cleanup_targets_follow_the_kind_of_target() {
        let policy = |target: &str| -> CleanupPolicy {
            serde_saphyr::from_str(&format!(
                "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {{name: p, namespace: team}}\nspec: {{target: {target}}}\n"
            ))
            .expect("policy")
        };
        let upstream: Upstream = serde_saphyr::from_str(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: hub, namespace: team}\nspec: {group: cache-org, url: 'https://registry-1.docker.io'}\n",
        )
        .expect("upstream");
        assert_eq!(
            policy_targets(&policy("{containerRepositories: {project: a/b}}"), []),
            vec![Target::Project(PathOrId::parse("a/b"))]
        );
        assert_eq!(
            policy_targets(&policy("{containerRepositories: {group: a}}"), []),
            vec![Target::GroupProjects(PathOrId::parse("a"))]
        );
        let cache = policy("{upstreamCache: {upstreamRef: {name: hub}}}");
        assert_eq!(
            policy_targets(&cache, [&upstream]),
            vec![Target::Group(PathOrId::parse("cache-org"))]
        );
        let mut elsewhere = upstream.clone();
        elsewhere.metadata.namespace = Some("other".into());
        assert!(policy_targets(&cache, [&elsewhere]).is_empty());
        assert!(policy_contender(&cache, Some(&default())).claims.is_empty());
        let mut gitlab_policy = policy("{containerRepositories: {project: A/B}}");
        gitlab_policy.spec.strategy = CleanupStrategy::GitLabPolicy;
        assert_eq!(
            policy_contender(&gitlab_policy, Some(&default())).claims[0].object,
            GitLabObject::ProjectCleanupPolicy {
                project: "a/b".into()
            }
        );
    }
}
