//! `export`: the manifests that describe what GitLab already holds for one top-level group —
//! its virtual registries (upstreams in GitLab's order), its upstreams (with a Secret
//! manifest for the credentials GitLab only half returns) and the GitLab cleanup policies
//! enabled on its projects — so that a group made by hand comes under GitOps, and `plan` of
//! the export against the same GitLab reports no change.
//!
//! Reading GitLab ([`read_group`]) is the only I/O; turning what was read into manifests
//! ([`export_group`]) is pure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use serde::Serialize;
use serde_json::json;

use super::Error;
use crate::crd::{CleanupPolicy, Upstream, VirtualRegistry};
use crate::gitlab::{self, ContainerExpirationPolicy, GitLabClient, PathOrId};

pub use crate::crd::upstream::PLACEHOLDER_PASSWORD;

/// Longest Kubernetes name the export derives (a DNS-1123 label, valid for every kind).
const MAX_NAME_LENGTH: usize = 63;

/// How many project policies are read at once.
const PROJECT_READS_IN_FLIGHT: usize = 8;

/// What GitLab holds for one top-level group, as read.
#[derive(Debug, Clone, Default)]
pub struct GroupContents {
    pub registries: Vec<RegistryContents>,
    pub upstreams: Vec<gitlab::Upstream>,
    /// Projects of the group and its subgroups with their cleanup policy, if GitLab has one.
    pub projects: Vec<ProjectPolicy>,
}

#[derive(Debug, Clone)]
pub struct RegistryContents {
    pub registry: gitlab::VirtualRegistry,
    /// Ids of its upstreams, in GitLab's position order.
    pub upstream_ids: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct ProjectPolicy {
    pub project_id: i64,
    pub path_with_namespace: String,
    pub policy: Option<ContainerExpirationPolicy>,
}

/// Reads the registries (with their upstream order), upstreams and project cleanup policies
/// of `group`; GET requests only.
pub async fn read_group(client: &GitLabClient, group: &PathOrId) -> Result<GroupContents, Error> {
    let mut registries = Vec::new();
    for registry in client.list_registries(group).await? {
        let mut members = client.list_registry_upstreams(registry.id).await?;
        members.sort_by_key(|upstream| {
            upstream
                .registry_upstream
                .as_ref()
                .map_or(i64::MAX, |association| association.position)
        });
        registries.push(RegistryContents {
            upstream_ids: members.iter().map(|upstream| upstream.id).collect(),
            registry,
        });
    }
    let upstreams = client.list_group_upstreams_all(group, None).await?;
    let listed = client.list_group_projects_all(group).await?;
    // The list's project entity may omit the policy: each project is read on its own.
    let projects: Vec<Result<ProjectPolicy, Error>> = futures::stream::iter(listed)
        .map(|project| async move {
            let policy = client.get_cleanup_policy(&PathOrId::Id(project.id)).await?;
            Ok(ProjectPolicy {
                project_id: project.id,
                path_with_namespace: project
                    .path_with_namespace
                    .unwrap_or_else(|| project.id.to_string()),
                policy,
            })
        })
        .buffered(PROJECT_READS_IN_FLIGHT)
        .collect()
        .await;
    Ok(GroupContents {
        registries,
        upstreams,
        projects: projects.into_iter().collect::<Result<_, _>>()?,
    })
}

/// One exported object.
#[derive(Debug, Clone)]
pub struct Document {
    pub kind: &'static str,
    pub name: String,
    /// What GitLab object it stands for, as a comment line (without `# `).
    pub origin: String,
    /// The manifest, YAML, comments included.
    pub yaml: String,
}

impl Document {
    /// `<kind>-<name>.yaml`, as the files in `examples/` are named.
    pub fn file_name(&self) -> String {
        format!("{}-{}.yaml", self.kind.to_ascii_lowercase(), self.name)
    }
}

/// The manifests, and what could not be exported as it is in GitLab.
#[derive(Debug, Clone, Default)]
pub struct Export {
    pub documents: Vec<Document>,
    pub warnings: Vec<String>,
}

/// Where the export came from and when, for the header comment.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub group: String,
    /// The GitLab URL; `None`: the embedded simulator.
    pub gitlab_url: Option<String>,
    pub at: Timestamp,
}

impl Provenance {
    /// The header comment: when, from where, and how to check it.
    pub fn header(&self, check_path: &str) -> String {
        let (source, environment) = match &self.gitlab_url {
            Some(url) => (url.as_str(), format!("GITLAB_URL={url} GITLAB_TOKEN=... ")),
            None => (
                "the embedded GitLab simulator (demo data; no --gitlab-url / GITLAB_URL given)",
                String::new(),
            ),
        };
        format!(
            "# Exported by `gitlab-registry-operator export --group {group}` at {at}\n\
             # from {source}: what GitLab held for group {group} at that time.\n\
             # Check it against GitLab: {environment}gitlab-registry-operator plan -f {check_path}\n\
             # (exit 0 and \"No changes\" while GitLab is in line with these manifests).\n\
             # Objects are exported with deletionPolicy: Orphan (deleting one leaves GitLab as it is);\n\
             # Secrets carry a placeholder password: GitLab never returns upstream passwords.\n",
            group = self.group,
            at = self.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    }
}

/// All documents as one multi-document YAML stream under the header.
pub fn render_stream(export: &Export, provenance: &Provenance) -> String {
    let mut out = provenance.header("<this file>");
    for document in &export.documents {
        out.push_str("---\n");
        out.push_str(&document.yaml);
    }
    out
}

/// YAML files in `dir` that the export did not write (left from an earlier export of an
/// object GitLab no longer holds, or added by hand): `plan -f dir` still reads them.
pub fn files_not_written(dir: &Path, written: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut others: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                && !written.contains(path)
        })
        .collect();
    others.sort();
    others
}

/// Writes one file per document into `dir` (created if missing), each under the header;
/// returns the paths written.
pub fn write_files(
    export: &Export,
    provenance: &Provenance,
    dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    let write_error = |path: &Path, source: std::io::Error| Error::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|source| write_error(dir, source))?;
    let header = provenance.header(&dir.display().to_string());
    let mut written = Vec::new();
    for document in &export.documents {
        let path = dir.join(document.file_name());
        std::fs::write(&path, format!("{header}{}", document.yaml))
            .map_err(|source| write_error(&path, source))?;
        written.push(path);
    }
    Ok(written)
}

/// The manifests of `contents`: registries, then each upstream followed by its Secret, then
/// cleanup policies; each kind in GitLab id order, so names are claimed deterministically.
pub fn export_group(
    group: &str,
    namespace: Option<&str>,
    contents: &GroupContents,
) -> Result<Export, Error> {
    let mut export = Export::default();
    if let Some(namespace) = namespace
        && kubernetes_name(namespace).as_deref() != Some(namespace)
    {
        return Err(Error::Export(format!(
            "--namespace {namespace:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63)"
        )));
    }

    let mut upstreams: Vec<&gitlab::Upstream> = contents.upstreams.iter().collect();
    upstreams.sort_by_key(|upstream| upstream.id);
    let mut upstream_names = Names::default();
    let mut secret_names = Names::default();
    let mut upstream_name_of: BTreeMap<i64, String> = BTreeMap::new();
    let mut upstream_documents = Vec::new();
    let mut name_and_url_seen: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for upstream in &upstreams {
        if let Some(first) = name_and_url_seen.insert((&upstream.name, &upstream.url), upstream.id)
        {
            export.warnings.push(format!(
                "upstreams {first} and {} share name {:?} and url {}: the operator finds an upstream by name and url, \
                 so both manifests would stand for upstream {first}; rename one in GitLab first",
                upstream.id, upstream.name, upstream.url
            ));
        }
        let name = upstream_names.claim(&upstream.name, "upstream", upstream.id);
        upstream_name_of.insert(upstream.id, name.clone());
        let username = upstream.username.as_deref().filter(|u| !u.is_empty());
        let secret_name = username
            .map(|_| secret_names.claim(&format!("{name}-credentials"), "secret", upstream.id));
        let cache_validity_hours = i32::try_from(upstream.cache_validity_hours).map_err(|_| {
            Error::Export(format!(
                "upstream {}: cacheValidityHours {} does not fit the Upstream kind",
                upstream.id, upstream.cache_validity_hours
            ))
        })?;
        let mut spec = json!({
            "group": group,
            "name": upstream.name,
            "url": upstream.url,
            "cacheValidityHours": cache_validity_hours,
            "deletionPolicy": "Orphan",
        });
        if let Some(description) = non_empty(upstream.description.as_deref()) {
            spec["description"] = json!(description);
        }
        if let Some(secret_name) = &secret_name {
            spec["credentialsSecretRef"] =
                json!({"name": secret_name, "usernameKey": "username", "passwordKey": "password"});
        }
        let object: Upstream = typed("Upstream", &name, namespace, spec)?;
        upstream_documents.push(document(
            "Upstream",
            name.clone(),
            format!(
                "GitLab upstream {} ({:?}) of group {group}",
                upstream.id, upstream.name
            ),
            &object,
        )?);
        if let (Some(secret_name), Some(username)) = (secret_name, username) {
            upstream_documents.push(credentials_secret(
                &secret_name,
                namespace,
                username,
                upstream,
            )?);
        }
    }

    let mut registries: Vec<&RegistryContents> = contents.registries.iter().collect();
    registries.sort_by_key(|registry| registry.registry.id);
    let mut registry_names = Names::default();
    for contents in registries {
        let registry = &contents.registry;
        let name = registry_names.claim(&registry.name, "registry", registry.id);
        let mut members = Vec::new();
        for upstream_id in &contents.upstream_ids {
            match upstream_name_of.get(upstream_id) {
                Some(member) => members.push(json!({ "name": member })),
                None => {
                    return Err(Error::Export(format!(
                        "registry {} lists upstream {upstream_id}, which the group's upstream list does not hold",
                        registry.id
                    )));
                }
            }
        }
        let mut spec = json!({
            "group": group,
            "name": registry.name,
            "upstreams": members,
            "deletionPolicy": "Orphan",
        });
        if let Some(description) = non_empty(registry.description.as_deref()) {
            spec["description"] = json!(description);
        }
        let object: VirtualRegistry = typed("VirtualRegistry", &name, namespace, spec)?;
        export.documents.push(document(
            "VirtualRegistry",
            name,
            format!(
                "GitLab virtual registry {} ({:?}) of group {group}",
                registry.id, registry.name
            ),
            &object,
        )?);
    }
    export.documents.extend(upstream_documents);

    let mut projects: Vec<&ProjectPolicy> = contents.projects.iter().collect();
    projects.sort_by_key(|project| project.project_id);
    let mut policy_names = Names::default();
    for project in projects {
        let Some(policy) = project.policy.as_ref().filter(|policy| policy.enabled) else {
            continue;
        };
        let Some(name_regex) = non_empty(policy.name_regex.as_deref()) else {
            export.warnings.push(format!(
                "project {}: its enabled cleanup policy has no name regex, which GitLab requires; not exported",
                project.path_with_namespace
            ));
            continue;
        };
        // Named after the project's path below the top-level group.
        let relative = project
            .path_with_namespace
            .split_once('/')
            .map_or(project.path_with_namespace.as_str(), |(_, rest)| rest);
        let name = policy_names.claim(relative, "project", project.project_id);
        let mut rules = json!({ "nameRegexDelete": name_regex });
        if let Some(keep) = non_empty(policy.name_regex_keep.as_deref()) {
            rules["nameRegexKeep"] = json!(keep);
        }
        if let Some(keep_n) = policy.keep_n {
            rules["keepN"] = json!(keep_n);
        }
        if let Some(older_than) = &policy.older_than {
            rules["olderThan"] = json!(older_than);
        }
        let spec = json!({
            "strategy": "GitLabPolicy",
            "cadence": policy.cadence,
            "target": { "containerRepositories": { "project": project.path_with_namespace } },
            "rules": rules,
        });
        let object: CleanupPolicy = match typed("CleanupPolicy", &name, namespace, spec) {
            Ok(object) => object,
            Err(error) => {
                export.warnings.push(format!(
                    "project {}: its cleanup policy is not one the CleanupPolicy kind can state ({error}); not exported",
                    project.path_with_namespace
                ));
                continue;
            }
        };
        export.documents.push(document(
            "CleanupPolicy",
            name,
            format!(
                "GitLab cleanup policy of project {} (id {}), run by GitLab every {}",
                project.path_with_namespace, project.project_id, policy.cadence
            ),
            &object,
        )?);
    }
    Ok(export)
}

fn non_empty(text: Option<&str>) -> Option<&str> {
    text.filter(|text| !text.is_empty())
}

/// An object of `kind` from its spec as JSON, so that fields the kind defaults stay defaulted.
fn typed<K>(
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    spec: serde_json::Value,
) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + serde::de::DeserializeOwned,
{
    let mut metadata = json!({ "name": name });
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    serde_json::from_value(json!({
        "apiVersion": K::api_version(&()),
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
    }))
    .map_err(|error| Error::Export(format!("{kind} {name}: {error}")))
}

fn document<K: Serialize>(
    kind: &'static str,
    name: String,
    origin: String,
    object: &K,
) -> Result<Document, Error> {
    let yaml = serde_saphyr::to_string(object)
        .map_err(|error| Error::Export(format!("cannot render {kind} {name} as YAML: {error}")))?;
    Ok(Document {
        kind,
        yaml: format!("# {origin}\n{yaml}"),
        name,
        origin,
    })
}

/// The Secret an exported Upstream's `credentialsSecretRef` names: the username GitLab
/// returns and a placeholder password, with a comment on where the password must come from.
fn credentials_secret(
    name: &str,
    namespace: Option<&str>,
    username: &str,
    upstream: &gitlab::Upstream,
) -> Result<Document, Error> {
    let mut metadata = json!({ "name": name });
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "stringData": { "username": username, "password": PLACEHOLDER_PASSWORD },
    }))
    .map_err(|error| Error::Export(format!("Secret {name}: {error}")))?;
    let variable = super::manifests::environment_variable(name, "password");
    let mut document = document(
        "Secret",
        name.to_owned(),
        format!(
            "Credentials of GitLab upstream {} ({:?})",
            upstream.id, upstream.name
        ),
        &secret,
    )?;
    let comment = format!(
        "  # GitLab never returns the password: put the real one here (or create this Secret from your\n  \
         # secret store instead of committing it). Until then standalone plan/apply leave the password\n  \
         # GitLab holds alone, or take it from the environment variable {variable}.\n"
    );
    let mut yaml = String::new();
    for line in document.yaml.lines() {
        if line.trim_start().starts_with("password:") {
            yaml.push_str(&comment);
        }
        yaml.push_str(line);
        yaml.push('\n');
    }
    document.yaml = yaml;
    Ok(document)
}

/// Kubernetes names claimed so far for one kind. A GitLab name maps to a DNS-1123 label; a
/// name already claimed (two GitLab names that differ only in case or punctuation) gets the
/// GitLab id appended, so that the result depends only on what GitLab holds.
#[derive(Debug, Default)]
struct Names {
    taken: BTreeSet<String>,
}

impl Names {
    fn claim(&mut self, gitlab_name: &str, fallback: &str, id: i64) -> String {
        let base = kubernetes_name(gitlab_name).unwrap_or_else(|| format!("{fallback}-{id}"));
        let mut candidate = base.clone();
        let mut attempt = 0u32;
        while self.taken.contains(&candidate) {
            let suffix = if attempt == 0 {
                format!("-{id}")
            } else {
                format!("-{id}-{attempt}")
            };
            candidate = format!(
                "{}{suffix}",
                truncate_name(&base, MAX_NAME_LENGTH - suffix.len())
            );
            attempt += 1;
        }
        self.taken.insert(candidate.clone());
        candidate
    }
}

/// A DNS-1123 label derived from a GitLab name: lower case, runs of anything but letters and
/// digits as one `-`, at most 63 characters; `None` when nothing is left.
fn kubernetes_name(gitlab_name: &str) -> Option<String> {
    let mut name = String::new();
    for c in gitlab_name.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_lowercase());
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = truncate_name(&name, MAX_NAME_LENGTH);
    (!name.is_empty()).then_some(name)
}

fn truncate_name(name: &str, length: usize) -> String {
    let cut: String = name.chars().take(length).collect();
    cut.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(id: i64, name: &str, url: &str, username: Option<&str>) -> gitlab::Upstream {
        serde_json::from_value(json!({
            "id": id, "group_id": 1, "name": name, "url": url, "username": username,
            "cache_validity_hours": 12, "description": "",
        }))
        .expect("upstream")
    }

    fn registry(id: i64, name: &str, upstream_ids: Vec<i64>) -> RegistryContents {
        RegistryContents {
            registry: serde_json::from_value(json!({"id": id, "name": name, "description": "d"}))
                .expect("registry"),
            upstream_ids,
        }
    }

    fn is_dns_label(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    #[test]
    fn names_are_dns_labels_and_collisions_get_the_gitlab_id() {
        let mut names = Names::default();
        assert_eq!(names.claim("Docker Hub", "upstream", 4), "docker-hub");
        assert_eq!(names.claim("docker_hub", "upstream", 9), "docker-hub-9");
        assert_eq!(
            names.claim("--Docker.Hub--", "upstream", 11),
            "docker-hub-11"
        );
        assert_eq!(names.claim("日本", "upstream", 12), "upstream-12");
        let long = "A".repeat(300);
        let first = names.claim(&long, "upstream", 13);
        let second = names.claim(&long, "upstream", 14);
        for name in [&first, &second] {
            assert!(is_dns_label(name), "{name}");
        }
        assert_ne!(first, second);
        assert!(second.ends_with("-14"), "{second}");
    }

    #[test]
    fn the_same_gitlab_contents_give_the_same_names_whatever_the_listing_order() {
        let contents = GroupContents {
            registries: vec![
                registry(2, "Cache", vec![8, 7]),
                registry(1, "cache", vec![7]),
            ],
            upstreams: vec![
                upstream(8, "Quay", "https://quay.io", None),
                upstream(7, "quay", "https://quay.example.com", Some("bot")),
            ],
            projects: Vec::new(),
        };
        let mut reversed = contents.clone();
        reversed.registries.reverse();
        reversed.upstreams.reverse();
        let names = |export: &Export| -> Vec<String> {
            export
                .documents
                .iter()
                .map(|d| format!("{}/{}", d.kind, d.name))
                .collect()
        };
        let export = export_group("g", None, &contents).expect("exports");
        assert_eq!(
            names(&export),
            names(&export_group("g", None, &reversed).expect("exports"))
        );
        assert_eq!(
            names(&export),
            [
                "VirtualRegistry/cache",
                "VirtualRegistry/cache-2",
                "Upstream/quay",
                "Secret/quay-credentials",
                "Upstream/quay-8"
            ]
        );
        // Upstream order as GitLab has it, by the claimed names.
        let second: VirtualRegistry =
            serde_saphyr::from_str(&export.documents[1].yaml).expect("yaml");
        let order: Vec<&str> = second
            .spec
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        assert_eq!(order, ["quay-8", "quay"]);
        assert_eq!(second.spec.name.as_deref(), Some("Cache"));
    }

    #[test]
    fn secrets_carry_the_username_and_a_commented_placeholder() {
        let contents = GroupContents {
            upstreams: vec![upstream(3, "Hub", "https://hub.example.com", Some("robot"))],
            ..GroupContents::default()
        };
        let export = export_group("g", Some("registries"), &contents).expect("exports");
        let secret = &export.documents[1];
        assert_eq!(secret.kind, "Secret");
        let parsed: Secret = serde_saphyr::from_str(&secret.yaml).expect("yaml");
        let data = parsed.string_data.expect("stringData");
        assert_eq!(data["username"], "robot");
        assert_eq!(data["password"], PLACEHOLDER_PASSWORD);
        assert_eq!(parsed.metadata.namespace.as_deref(), Some("registries"));
        let comment_then_password = secret
            .yaml
            .split_once("GitLab never returns the password")
            .map(|(_, rest)| rest)
            .expect("comment");
        assert!(comment_then_password.contains("HUB_CREDENTIALS_PASSWORD"));
        assert!(comment_then_password.contains("password:"));
    }

    #[test]
    fn upstreams_the_operator_cannot_tell_apart_are_warned_about() {
        let contents = GroupContents {
            upstreams: vec![
                upstream(1, "Hub", "https://hub.example.com", Some("a")),
                upstream(2, "Hub", "https://hub.example.com", Some("b")),
                upstream(3, "Hub", "https://other.example.com", None),
            ],
            ..GroupContents::default()
        };
        let export = export_group("g", None, &contents).expect("exports");
        assert_eq!(export.warnings.len(), 1, "{:?}", export.warnings);
        assert!(export.warnings[0].contains("upstreams 1 and 2"));
        let error = export_group("g", Some("Not_Valid"), &contents).expect_err("namespace");
        assert!(error.to_string().contains("--namespace"), "{error}");
    }

    #[test]
    fn only_enabled_project_policies_are_exported() {
        let policy = |enabled: bool, name_regex: Option<&str>| ContainerExpirationPolicy {
            cadence: "7d".into(),
            enabled,
            keep_n: Some(10),
            older_than: None,
            name_regex: name_regex.map(str::to_owned),
            name_regex_keep: Some(String::new()),
            next_run_at: None,
        };
        let project = |id: i64, path: &str, policy| ProjectPolicy {
            project_id: id,
            path_with_namespace: path.into(),
            policy,
        };
        let contents = GroupContents {
            projects: vec![
                project(1, "g/off", Some(policy(false, Some(".*")))),
                project(2, "g/sub/app", Some(policy(true, Some("v.*")))),
                project(3, "g/none", None),
                project(4, "g/blank", Some(policy(true, None))),
            ],
            ..GroupContents::default()
        };
        let export = export_group("g", None, &contents).expect("exports");
        assert_eq!(export.documents.len(), 1, "{export:#?}");
        assert_eq!(export.warnings.len(), 1, "{:?}", export.warnings);
        let policy: CleanupPolicy =
            serde_saphyr::from_str(&export.documents[0].yaml).expect("yaml");
        assert_eq!(policy.metadata.name.as_deref(), Some("sub-app"));
        let rules = policy.spec.rules.expect("rules");
        assert_eq!(rules.name_regex_delete.as_deref(), Some("v.*"));
        assert_eq!(rules.name_regex_keep, None);
        assert_eq!(rules.keep_n, Some(10));
        assert_eq!(rules.older_than, None);
    }
}
