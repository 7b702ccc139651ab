//! JSON renderings of simulator records in GitLab's API entity shapes (field names, nesting,
//! time formats) as the API pages document them.

use jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::state::{
    Association, CacheEntry, Group, Project, ProtectionRule, Registry, Repository, State, Tag,
    Upstream,
};

/// GitLab's API time format: `2024-05-30T12:28:27.855Z`.
pub fn time(timestamp: Timestamp) -> String {
    format!(
        "{}.{:03}Z",
        timestamp.strftime("%Y-%m-%dT%H:%M:%S"),
        timestamp.subsec_millisecond().unsigned_abs()
    )
}

/// The container registry's tag time format: `2019-01-06T16:49:51.272+00:00`.
fn tag_time(timestamp: Timestamp) -> String {
    format!(
        "{}.{:03}+00:00",
        timestamp.strftime("%Y-%m-%dT%H:%M:%S"),
        timestamp.subsec_millisecond().unsigned_abs()
    )
}

fn optional_time(timestamp: Option<Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |timestamp| Value::String(time(timestamp)))
}

pub fn registry(registry: &Registry) -> Value {
    json!({
        "id": registry.id,
        "group_id": registry.group_id,
        "name": registry.name,
        "description": registry.description,
        "created_at": time(registry.created_at),
        "updated_at": time(registry.updated_at),
    })
}

/// `GET /registries/:id`: the registry with its associations by position.
pub fn registry_details(state: &State, record: &Registry) -> Value {
    let mut value = registry(record);
    let associations: Vec<Value> = state
        .associations_of_registry(record.id)
        .into_iter()
        .map(|association| {
            json!({
                "id": association.id,
                "position": association.position,
                "upstream_id": association.upstream_id,
            })
        })
        .collect();
    value["registry_upstreams"] = Value::Array(associations);
    value
}

pub fn upstream(upstream: &Upstream) -> Value {
    json!({
        "id": upstream.id,
        "group_id": upstream.group_id,
        "url": upstream.url,
        "name": upstream.name,
        "description": upstream.description,
        "cache_validity_hours": upstream.cache_validity_hours,
        "username": upstream.username,
        "created_at": time(upstream.created_at),
        "updated_at": time(upstream.updated_at),
    })
}

/// An upstream as listed under a registry, with that registry's association.
pub fn upstream_in_registry(record: &Upstream, association: &Association) -> Value {
    let mut value = upstream(record);
    value["registry_upstream"] = json!({
        "id": association.id,
        "registry_id": association.registry_id,
        "position": association.position,
    });
    value
}

/// `GET /upstreams/:id`: the upstream with all its associations.
pub fn upstream_details(state: &State, record: &Upstream) -> Value {
    let mut value = upstream(record);
    let mut associations = state.associations_of_upstream(record.id);
    associations.sort_by_key(|association| association.id);
    value["registry_upstreams"] = Value::Array(
        associations
            .into_iter()
            .map(|association| {
                json!({
                    "id": association.id,
                    "registry_id": association.registry_id,
                    "position": association.position,
                })
            })
            .collect(),
    );
    value
}

pub fn association(association: &Association) -> Value {
    json!({
        "id": association.id,
        "registry_id": association.registry_id,
        "upstream_id": association.upstream_id,
        "position": association.position,
    })
}

/// A cache entry as GitLab's entity shows it (no `file_md5`, whatever the documentation's
/// example says).
pub fn cache_entry(entry: &CacheEntry) -> Value {
    json!({
        "id": entry.id(),
        "group_id": entry.group_id,
        "upstream_id": entry.upstream_id,
        "upstream_checked_at": time(entry.upstream_checked_at),
        "file_sha1": entry.file_sha1,
        "size": entry.size,
        "relative_path": entry.relative_path,
        "content_type": entry.content_type,
        "upstream_etag": entry.upstream_etag,
        "created_at": time(entry.created_at),
        "updated_at": time(entry.updated_at),
        "downloads_count": entry.downloads_count,
        "downloaded_at": time(entry.downloaded_at),
    })
}

/// Which optional repository fields a request asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct RepositoryExtras {
    pub tags: bool,
    pub tags_count: bool,
    pub size: bool,
}

pub fn repository(record: &Repository, registry_host: &str, extras: RepositoryExtras) -> Value {
    let mut value = json!({
        "id": record.id,
        "name": record.name,
        "path": record.path,
        "project_id": record.project_id,
        "location": format!("{registry_host}/{}", record.path),
        "created_at": time(record.created_at),
        "cleanup_policy_started_at": optional_time(record.cleanup_policy_started_at),
        "status": Value::Null,
    });
    if extras.tags_count {
        value["tags_count"] = json!(record.tags.len());
    }
    if extras.tags {
        value["tags"] = Value::Array(
            record
                .tags
                .values()
                .map(|tag| tag_summary(record, tag, registry_host))
                .collect(),
        );
    }
    if extras.size {
        let mut seen = std::collections::BTreeSet::new();
        let size: u64 = record
            .tags
            .values()
            .filter(|tag| {
                tag.digest
                    .as_ref()
                    .is_some_and(|digest| seen.insert(digest))
            })
            .map(|tag| tag.total_size)
            .sum();
        value["size"] = json!(size);
    }
    value
}

pub fn tag_summary(repository: &Repository, tag: &Tag, registry_host: &str) -> Value {
    json!({
        "name": tag.name,
        "path": format!("{}:{}", repository.path, tag.name),
        "location": format!("{registry_host}/{}:{}", repository.path, tag.name),
    })
}

pub fn tag_details(repository: &Repository, tag: &Tag, registry_host: &str) -> Value {
    let mut value = tag_summary(repository, tag, registry_host);
    // The config digest ("revision") is not modelled; derive a stable one from the digest.
    let revision = tag.digest.as_ref().map(|digest| {
        let hex = digest
            .split_once(':')
            .map_or(digest.as_str(), |(_, hex)| hex);
        hex.chars().rev().collect::<String>()
    });
    let short_revision = revision
        .as_ref()
        .map(|revision| revision.chars().take(9).collect::<String>());
    let extra = json!({
        "revision": revision,
        "short_revision": short_revision,
        "digest": tag.digest,
        "created_at": tag.created_at.map(tag_time),
        "total_size": tag.digest.as_ref().map(|_| tag.total_size),
    });
    if let (Value::Object(target), Value::Object(source)) = (&mut value, extra) {
        target.extend(source);
    }
    value
}

/// A branch as `GET /projects/:id/repository/branches` lists it (the fields a client reads;
/// the simulator keeps no commits).
pub fn branch(name: &str) -> Value {
    json!({
        "name": name,
        "merged": false,
        "protected": false,
        "default": name == "main",
        "developers_can_push": false,
        "developers_can_merge": false,
        "can_push": true,
    })
}

pub fn protection_rule(rule: &ProtectionRule) -> Value {
    json!({
        "id": rule.id,
        "project_id": rule.project_id,
        "tag_name_pattern": rule.tag_name_pattern,
        "minimum_access_level_for_push": rule.minimum_access_level_for_push,
        "minimum_access_level_for_delete": rule.minimum_access_level_for_delete,
    })
}

pub fn project(record: &Project, namespace: Option<&Group>, web_base: &str) -> Value {
    let policy = &record.container_expiration_policy;
    let namespace_value = namespace.map_or(Value::Null, |group| {
        json!({
            "id": group.id,
            "name": group.name,
            "path": group.full_path.rsplit('/').next().unwrap_or(&group.full_path),
            "kind": "group",
            "full_path": group.full_path,
            "parent_id": group.parent_id,
        })
    });
    let mut value = Map::new();
    value.insert("id".into(), json!(record.id));
    value.insert("name".into(), json!(record.name));
    value.insert(
        "name_with_namespace".into(),
        json!(record.path_with_namespace.replace('/', " / ")),
    );
    value.insert("path".into(), json!(record.path));
    value.insert(
        "path_with_namespace".into(),
        json!(record.path_with_namespace),
    );
    value.insert("created_at".into(), json!(time(record.created_at)));
    value.insert(
        "web_url".into(),
        json!(format!("{web_base}/{}", record.path_with_namespace)),
    );
    value.insert("namespace".into(), namespace_value);
    value.insert(
        "container_registry_enabled".into(),
        json!(record.container_registry_access_level != "disabled"),
    );
    value.insert(
        "container_registry_access_level".into(),
        json!(record.container_registry_access_level),
    );
    value.insert(
        "container_expiration_policy".into(),
        json!({
            "cadence": policy.cadence,
            "enabled": policy.enabled,
            "keep_n": policy.keep_n,
            "older_than": policy.older_than,
            "name_regex": policy.name_regex,
            "name_regex_keep": policy.name_regex_keep,
            "next_run_at": optional_time(policy.next_run_at),
        }),
    );
    Value::Object(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_use_gitlab_formats() {
        let timestamp: Timestamp = "2024-05-30T12:28:27.855123Z".parse().unwrap();
        assert_eq!(time(timestamp), "2024-05-30T12:28:27.855Z");
        assert_eq!(tag_time(timestamp), "2024-05-30T12:28:27.855+00:00");
        let whole: Timestamp = "2024-05-30T12:28:27Z".parse().unwrap();
        assert_eq!(time(whole), "2024-05-30T12:28:27.000Z");
    }
}
