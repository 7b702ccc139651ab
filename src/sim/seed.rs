//! Seed data for the simulator: the groups, projects (with their branches), container
//! repositories, tags, tag protection rules and (optionally) virtual registries, upstreams and
//! cache entries that exist before the first request. Readable from JSON or YAML;
//! [`Seed::demo`] is the data the demo and `sim` use by default.

use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

use super::state::{AccessLevel, pseudo_hex};

/// Why a seed could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read seed file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse seed: {0}")]
    Parse(String),
    #[error("seed names an unknown {0}")]
    Unknown(String),
    #[error("seed repeats an existing {0}")]
    Duplicate(String),
    #[error("invalid seed: {0}")]
    Invalid(String),
}

impl SeedError {
    /// A stable CamelCase reason for conditions and control endpoint errors.
    pub fn reason(&self) -> &'static str {
        match self {
            SeedError::Read { .. } => "SeedUnreadable",
            SeedError::Parse(_) => "SeedUnparsable",
            SeedError::Unknown(_) => "SeedReferenceUnknown",
            SeedError::Duplicate(_) => "SeedDuplicate",
            SeedError::Invalid(_) => "SeedInvalid",
        }
    }
}

/// Everything a seed can create. Every list is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Groups and subgroups; a subgroup's parent is the group whose full path prefixes it.
    #[serde(default)]
    pub groups: Vec<SeedGroup>,
    #[serde(default)]
    pub projects: Vec<SeedProject>,
    #[serde(default)]
    pub registries: Vec<SeedRegistry>,
    /// Upstreams are listed after registries: they name the registries they belong to.
    #[serde(default)]
    pub upstreams: Vec<SeedUpstream>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedGroup {
    pub id: u64,
    pub full_path: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedProject {
    pub id: u64,
    /// `<group full path>/<project path>`; the group must exist.
    pub path_with_namespace: String,
    #[serde(default)]
    pub repositories: Vec<SeedRepository>,
    #[serde(default)]
    pub tag_protection_rules: Vec<SeedProtectionRule>,
    /// Branch names of the project's repository, e.g. `["main", "feature/Login-Form"]`.
    #[serde(default)]
    pub branches: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRepository {
    #[serde(default)]
    pub id: Option<u64>,
    /// `""` (the default) is the project's root image.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub tags: Vec<SeedTag>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedTag {
    pub name: String,
    /// No digest: the tag has no manifest.
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub total_size: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedProtectionRule {
    pub tag_name_pattern: String,
    #[serde(default)]
    pub minimum_access_level_for_push: AccessLevel,
    #[serde(default)]
    pub minimum_access_level_for_delete: AccessLevel,
}

/// A group named by id or full path.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GroupRef {
    Id(u64),
    Path(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRegistry {
    #[serde(default)]
    pub id: Option<u64>,
    pub group: GroupRef,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedUpstream {
    #[serde(default)]
    pub id: Option<u64>,
    pub group: GroupRef,
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default, deserialize_with = "optional_secret")]
    pub password: Option<SecretString>,
    #[serde(default)]
    pub cache_validity_hours: Option<i64>,
    /// Names of registries in the same group, associated in this order.
    #[serde(default)]
    pub registries: Vec<String>,
    #[serde(default)]
    pub cache_entries: Vec<SeedCacheEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedCacheEntry {
    pub relative_path: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub downloads_count: Option<u64>,
    #[serde(default)]
    pub downloaded_at: Option<Timestamp>,
    #[serde(default)]
    pub created_at: Option<Timestamp>,
}

fn optional_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.map(SecretString::from))
}

impl Seed {
    /// Parses JSON (text starting with `{`) or YAML.
    pub fn parse(text: &str) -> Result<Self, SeedError> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|error| SeedError::Parse(error.to_string()))
        } else {
            serde_saphyr::from_str(text).map_err(|error| SeedError::Parse(error.to_string()))
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, SeedError> {
        let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Demo data relative to the current time (see [`Seed::demo_at`]).
    pub fn demo() -> Self {
        Self::demo_at(Timestamp::now())
    }

    /// Demo data: top-level group `my-org` (id 100) with subgroup `my-org/platform` (101),
    /// projects `my-org/app` (200), `my-org/api` (201) and `my-org/platform/tools` (202),
    /// each with repositories of realistic tags (semver, 40-hex git shas, `main`,
    /// `stable-1`, `latest`, a tag without manifest) created from 120 days to 1 hour before
    /// `now`, with shared digests; `my-org/app` protects `1.2.x` tags from deletion by
    /// anyone below Owner. Upstream `Docker Hub` (id 400, no registry yet) holds a few cache
    /// entries downloaded from 2 to 90 days ago.
    pub fn demo_at(now: Timestamp) -> Self {
        let days_ago = |days: i64| now - SignedDuration::from_hours(24 * days);
        let tag = |name: &str, digest_of: &str, days: i64, size: u64| SeedTag {
            name: name.to_owned(),
            digest: Some(format!("sha256:{}", pseudo_hex(digest_of, 64))),
            created_at: Some(days_ago(days)),
            total_size: size,
        };
        let sha = |seed: &str| pseudo_hex(seed, 40);
        let app_tags = vec![
            tag("latest", "app-1.4.0", 3, 48_210_944),
            tag("1.4.0", "app-1.4.0", 3, 48_210_944),
            tag("1.3.2", "app-1.3.2", 21, 47_992_117),
            tag("1.3.1", "app-1.3.1", 35, 47_981_002),
            tag("1.3.0", "app-1.3.0", 49, 47_950_311),
            tag("1.2.1", "app-1.2.1", 80, 46_100_777),
            tag("1.2.0", "app-1.2.0", 95, 46_001_200),
            tag("main", "app-main", 1, 48_300_001),
            tag(&sha("app-main"), "app-main", 1, 48_300_001),
            tag(&sha("app-old-1"), "app-old-1", 30, 48_000_420),
            tag(&sha("app-old-2"), "app-old-2", 45, 47_990_006),
            tag(&sha("app-old-3"), "app-old-3", 60, 47_900_150),
            tag("stable-1", "app-1.3.2", 21, 47_992_117),
            SeedTag {
                name: "broken-push".into(),
                digest: None,
                created_at: None,
                total_size: 0,
            },
        ];
        let worker_tags = vec![
            tag("latest", "worker-2.0.0", 5, 30_112_000),
            tag("2.0.0", "worker-2.0.0", 5, 30_112_000),
            tag("1.9.0", "worker-1.9.0", 40, 29_880_000),
            tag(&sha("worker-a"), "worker-a", 10, 30_100_100),
            tag(&sha("worker-b"), "worker-b", 50, 29_870_000),
        ];
        let api_tags = vec![
            tag("latest", "api-3.1.0", 2, 62_000_000),
            tag("3.1.0", "api-3.1.0", 2, 62_000_000),
            tag("3.0.0", "api-3.0.0", 30, 61_500_000),
            tag("2.9.9", "api-2.9.9", 120, 60_900_000),
            tag("main", "api-main", 0, 62_100_000),
            tag("stable-1", "api-3.0.0", 30, 61_500_000),
            tag(&sha("api-x"), "api-x", 15, 62_010_000),
            tag(&sha("api-y"), "api-y", 70, 61_000_000),
        ];
        let migration_tags = vec![
            tag("latest", "migrations-7", 9, 12_000_000),
            tag("7", "migrations-7", 9, 12_000_000),
            tag("6", "migrations-6", 65, 11_900_000),
        ];
        let tools_tags = vec![
            tag("latest", "tools-0.3.0", 12, 8_000_000),
            tag("0.3.0", "tools-0.3.0", 12, 8_000_000),
            tag("0.2.0", "tools-0.2.0", 100, 7_800_000),
        ];
        let repository = |id: u64, name: &str, tags: Vec<SeedTag>| SeedRepository {
            id: Some(id),
            name: name.to_owned(),
            created_at: Some(days_ago(365)),
            tags,
        };
        let cache_entry = |path: &str, days: i64, downloads: u64, size: u64| SeedCacheEntry {
            relative_path: path.to_owned(),
            size: Some(size),
            content_type: Some(if path.contains("/blobs/") {
                "application/octet-stream".to_owned()
            } else {
                "application/vnd.docker.distribution.manifest.v2+json".to_owned()
            }),
            downloads_count: Some(downloads),
            downloaded_at: Some(days_ago(days)),
            created_at: Some(days_ago(days.max(1) + 30)),
        };
        let alpine_blob = format!("library/alpine/blobs/sha256:{}", pseudo_hex("alpine", 64));
        Seed {
            groups: vec![
                SeedGroup {
                    id: 100,
                    full_path: "my-org".into(),
                    name: Some("My Org".into()),
                },
                SeedGroup {
                    id: 101,
                    full_path: "my-org/platform".into(),
                    name: Some("Platform".into()),
                },
            ],
            projects: vec![
                SeedProject {
                    id: 200,
                    path_with_namespace: "my-org/app".into(),
                    repositories: vec![
                        repository(300, "", app_tags),
                        repository(301, "worker", worker_tags),
                    ],
                    tag_protection_rules: vec![SeedProtectionRule {
                        tag_name_pattern: r"^1\.2\.\d+$".into(),
                        minimum_access_level_for_push: AccessLevel::Maintainer,
                        minimum_access_level_for_delete: AccessLevel::Owner,
                    }],
                    branches: vec!["main".into(), "feature/Login-Form".into()],
                },
                SeedProject {
                    id: 201,
                    path_with_namespace: "my-org/api".into(),
                    repositories: vec![
                        repository(302, "", api_tags),
                        repository(303, "migrations", migration_tags),
                    ],
                    tag_protection_rules: Vec::new(),
                    branches: Vec::new(),
                },
                SeedProject {
                    id: 202,
                    path_with_namespace: "my-org/platform/tools".into(),
                    repositories: vec![repository(304, "", tools_tags)],
                    tag_protection_rules: Vec::new(),
                    branches: Vec::new(),
                },
            ],
            registries: Vec::new(),
            upstreams: vec![SeedUpstream {
                id: Some(400),
                group: GroupRef::Path("my-org".into()),
                name: "Docker Hub".into(),
                url: "https://registry-1.docker.io".into(),
                description: Some("Docker Hub (pre-existing, not yet in a registry)".into()),
                username: None,
                password: None,
                cache_validity_hours: Some(24),
                registries: Vec::new(),
                cache_entries: vec![
                    cache_entry("library/alpine/manifests/3.19", 2, 40, 1_472),
                    cache_entry("library/alpine/manifests/3.17", 45, 3, 1_468),
                    cache_entry(&alpine_blob, 2, 40, 3_408_729),
                    cache_entry("library/nginx/manifests/1.25", 90, 1, 1_571),
                    cache_entry("library/redis/manifests/7", 31, 7, 1_890),
                ],
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::state::State;

    #[test]
    fn demo_seed_applies() {
        let mut state = State::new();
        state.apply_seed(&Seed::demo()).unwrap();
        let snapshot = state.snapshot();
        assert_eq!(snapshot.groups.len(), 2);
        assert_eq!(snapshot.projects.len(), 3);
        assert_eq!(snapshot.repositories.len(), 5);
        assert_eq!(snapshot.protection_rules.len(), 1);
        assert_eq!(snapshot.cache_entries.len(), 5);
        assert!(state.is_protected(200, "1.2.0", AccessLevel::Maintainer));
    }

    #[test]
    fn yaml_and_json_seeds_parse() {
        let yaml = "groups:\n  - {id: 1, full_path: g}\nprojects:\n  - id: 2\n    path_with_namespace: g/p\n    repositories:\n      - tags:\n          - {name: v1, digest: 'sha256:aa', created_at: '2024-01-01T00:00:00Z', total_size: 3}\n          - {name: nomanifest}\nupstreams:\n  - {group: g, name: hub, url: 'https://hub.example.com', username: u, password: p}\n";
        let seed = Seed::parse(yaml).unwrap();
        assert_eq!(seed.projects[0].repositories[0].tags.len(), 2);
        let mut state = State::new();
        state.apply_seed(&seed).unwrap();
        assert_eq!(state.snapshot().upstreams[0].username.as_deref(), Some("u"));
        let json = r#"{"groups":[{"id":7,"full_path":"x"}]}"#;
        assert_eq!(Seed::parse(json).unwrap().groups[0].id, 7);
        assert!(matches!(
            Seed::parse("{\"bogus\": 1}"),
            Err(SeedError::Parse(_))
        ));
    }

    #[test]
    fn seeds_referencing_unknown_groups_fail() {
        let seed = Seed::parse("projects:\n  - {id: 1, path_with_namespace: nowhere/p}\n").unwrap();
        let error = State::new().apply_seed(&seed).unwrap_err();
        assert_eq!(error.reason(), "SeedReferenceUnknown");
    }

    #[test]
    fn a_failing_seed_changes_nothing() {
        let seed = Seed::parse(
            "groups: [{id: 1, full_path: g}]\nprojects:\n  - {id: 1, path_with_namespace: ghost/p}\n",
        )
        .unwrap();
        let mut state = State::new();
        assert!(state.apply_seed(&seed).is_err());
        assert!(state.snapshot().groups.is_empty());
    }
}
