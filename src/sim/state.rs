//! The simulator's in-memory GitLab: groups, projects, container repositories and tags, tag
//! protection rules, virtual registries, upstreams, their associations and cache entries.
//!
//! Everything here is synchronous and free of HTTP so that GitLab's rules (validations, limits,
//! renumbering, cascades, bulk tag deletion) can be unit tested directly. Every rule failure is
//! an [`ApiError`] carrying the exact status code and JSON body GitLab answers with
//! (`gitlab-api/SEMANTICS.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use jiff::{SignedDuration, Timestamp};
use regex::Regex;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};

use super::seed::{GroupRef, Seed, SeedError};

/// GitLab's limit of virtual registries per top-level group.
pub const MAX_REGISTRIES_PER_GROUP: usize = 5;
/// GitLab's limit of upstreams associated with one virtual registry.
pub const MAX_UPSTREAMS_PER_REGISTRY: usize = 5;
/// Highest position `PATCH /registry_upstreams/:id` accepts.
pub const MAX_POSITION: i64 = 20;
/// GitLab's limit of tag protection rules per project.
pub const MAX_PROTECTION_RULES_PER_PROJECT: usize = 5;

const CADENCES: [&str; 5] = ["1d", "7d", "14d", "1month", "3month"];
const POLICY_KEEP_N: [i64; 6] = [1, 5, 10, 25, 50, 100];
const POLICY_OLDER_THAN: [&str; 4] = ["7d", "14d", "30d", "90d"];
const ACCESS_LEVELS: [&str; 3] = ["enabled", "private", "disabled"];

/// A GitLab API error: the HTTP status and the exact JSON body GitLab sends.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub body: Value,
}

impl ApiError {
    /// A Grape parameter error: `400 {"error": "<message>"}`.
    pub fn parameter(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            body: json!({ "error": message.into() }),
        }
    }

    /// A model validation error on one attribute: `400 {"message": {"<attr>": ["<msg>"]}}`.
    pub fn invalid(attribute: &str, message: &str) -> Self {
        let mut errors = ValidationErrors::default();
        errors.add(attribute, message);
        errors.into_error()
    }

    /// `400 {"message": "<message>"}`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            body: json!({ "message": message.into() }),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: 401,
            body: json!({ "message": "401 Unauthorized" }),
        }
    }

    pub fn forbidden() -> Self {
        Self {
            status: 403,
            body: json!({ "message": "403 Forbidden" }),
        }
    }

    /// `404 {"message": "404 Not found"}`: an unknown record.
    pub fn not_found() -> Self {
        Self {
            status: 404,
            body: json!({ "message": "404 Not found" }),
        }
    }

    /// `500 {"message": "500 Internal Server Error"}`: what GitLab answers when a database
    /// constraint fails at commit (INFERRED: no API handler rescues `RecordNotUnique`).
    pub fn internal() -> Self {
        Self {
            status: 500,
            body: json!({ "message": "500 Internal Server Error" }),
        }
    }

    /// `404 {"message": "404 <what> Not Found"}`, e.g. `Group`, `Project`, `Upstream`, `Tag`.
    pub fn not_found_named(what: &str) -> Self {
        Self {
            status: 404,
            body: json!({ "message": format!("404 {what} Not Found") }),
        }
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Collects Rails model validation errors, rendered as `{"message": {"<attr>": [..]}}`.
#[derive(Debug, Default)]
pub struct ValidationErrors(Vec<(String, String)>);

impl ValidationErrors {
    pub fn add(&mut self, attribute: &str, message: &str) {
        self.0.push((attribute.to_owned(), message.to_owned()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_error(self) -> ApiError {
        let mut by_attribute = serde_json::Map::new();
        for (attribute, message) in self.0 {
            let messages = by_attribute
                .entry(attribute)
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(list) = messages {
                list.push(Value::String(message));
            }
        }
        ApiError {
            status: 400,
            body: json!({ "message": by_attribute }),
        }
    }

    pub fn into_result(self) -> ApiResult<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.into_error())
        }
    }
}

/// GitLab roles, lowest first. Protection rules use `maintainer`, `owner` and `admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccessLevel {
    Guest,
    Reporter,
    Developer,
    #[default]
    Maintainer,
    Owner,
    Admin,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub id: u64,
    pub name: String,
    pub full_path: String,
    pub parent_id: Option<u64>,
}

impl Group {
    pub fn is_top_level(&self) -> bool {
        self.parent_id.is_none()
    }
}

/// A project's container expiration (cleanup) policy, as `PUT /projects/:id` manages it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExpirationPolicy {
    pub cadence: String,
    pub enabled: bool,
    pub keep_n: Option<i64>,
    pub older_than: Option<String>,
    pub name_regex: Option<String>,
    pub name_regex_keep: Option<String>,
    pub next_run_at: Option<Timestamp>,
}

impl Default for ExpirationPolicy {
    /// GitLab's defaults for a new project.
    fn default() -> Self {
        Self {
            cadence: "1d".into(),
            enabled: false,
            keep_n: Some(10),
            older_than: Some("90d".into()),
            name_regex: Some(".*".into()),
            name_regex_keep: None,
            next_run_at: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Project {
    pub id: u64,
    pub name: String,
    pub path: String,
    pub path_with_namespace: String,
    pub namespace_id: u64,
    pub created_at: Timestamp,
    pub container_registry_access_level: String,
    pub container_expiration_policy: ExpirationPolicy,
    /// Branch names of the project's repository, sorted by name as GitLab lists them.
    pub branches: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tag {
    pub name: String,
    /// `None`: a tag without a manifest.
    pub digest: Option<String>,
    pub created_at: Option<Timestamp>,
    pub total_size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Repository {
    pub id: u64,
    pub project_id: u64,
    /// `""` for the project's root image.
    pub name: String,
    /// Full path: `<project path_with_namespace>[/<name>]`.
    pub path: String,
    pub created_at: Timestamp,
    pub cleanup_policy_started_at: Option<Timestamp>,
    pub tags: BTreeMap<String, Tag>,
    pub last_bulk_delete_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProtectionRule {
    pub id: u64,
    pub project_id: u64,
    pub tag_name_pattern: String,
    pub minimum_access_level_for_push: AccessLevel,
    pub minimum_access_level_for_delete: AccessLevel,
}

#[derive(Debug, Clone, Serialize)]
pub struct Registry {
    pub id: u64,
    pub group_id: u64,
    pub name: String,
    pub description: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Upstream {
    pub id: u64,
    pub group_id: u64,
    pub name: String,
    pub description: Option<String>,
    pub url: String,
    pub username: Option<String>,
    /// Write-only, like GitLab: serialised only as `has_password`.
    #[serde(rename = "has_password", serialize_with = "serialize_is_some")]
    pub password: Option<SecretString>,
    pub cache_validity_hours: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

fn serialize_is_some<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(value.is_some())
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Association {
    pub id: u64,
    pub registry_id: u64,
    pub upstream_id: u64,
    pub position: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheEntry {
    pub group_id: u64,
    /// The entry's internal id within its group: lists show the highest (newest) first.
    /// Set by [`State::put_cache_entry`] for a new entry.
    pub iid: u64,
    pub upstream_id: u64,
    pub relative_path: String,
    pub upstream_checked_at: Timestamp,
    pub file_sha1: String,
    pub size: u64,
    pub content_type: String,
    pub upstream_etag: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub downloads_count: u64,
    pub downloaded_at: Timestamp,
}

impl CacheEntry {
    /// A file cached at `now`, downloaded once, without fingerprints (for tests and drift).
    /// [`State::put_cache_entry`] gives it its iid.
    pub fn cached_at(
        group_id: u64,
        upstream_id: u64,
        relative_path: impl Into<String>,
        now: Timestamp,
    ) -> Self {
        Self {
            group_id,
            iid: 0,
            upstream_id,
            relative_path: relative_path.into(),
            upstream_checked_at: now,
            file_sha1: String::new(),
            size: 1,
            content_type: String::new(),
            upstream_etag: String::new(),
            created_at: now,
            updated_at: now,
            downloads_count: 1,
            downloaded_at: now,
        }
    }

    /// GitLab's entry id: url-safe base64 of `"<group_id> <iid>"` (the documentation's
    /// `"<upstream_id> <relative_path>"` is not what the source builds).
    pub fn id(&self) -> String {
        cache_entry_id(self.group_id, self.iid)
    }
}

pub fn cache_entry_id(group_id: u64, iid: u64) -> String {
    URL_SAFE.encode(format!("{group_id} {iid}"))
}

/// Decodes a cache entry id into `(group_id, iid)`; anything else is GitLab's coercion
/// error (`400`, INFERRED text `{"error":"id is invalid"}`).
fn decode_cache_entry_id(encoded: &str) -> ApiResult<(u64, u64)> {
    let invalid = || ApiError::parameter("id is invalid");
    let decoded = URL_SAFE
        .decode(encoded)
        .or_else(|_| URL_SAFE_NO_PAD.decode(encoded))
        .or_else(|_| STANDARD.decode(encoded))
        .map_err(|_| invalid())?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
    let (group_id, iid) = decoded.split_once(' ').ok_or_else(invalid)?;
    Ok((
        group_id.parse().map_err(|_| invalid())?,
        iid.parse().map_err(|_| invalid())?,
    ))
}

/// The fields of a new upstream (`POST /registries/:id/upstreams`).
#[derive(Debug, Clone, Default)]
pub struct NewUpstream {
    pub name: String,
    pub url: String,
    pub description: Option<String>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub cache_validity_hours: Option<i64>,
}

/// The fields a `PATCH /upstreams/:id` sends; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct UpstreamChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub cache_validity_hours: Option<i64>,
}

/// A validated bulk tag delete request.
#[derive(Debug, Clone)]
pub struct BulkDelete {
    delete: Regex,
    keep: Option<Regex>,
    keep_n: Option<i64>,
    /// As sent: GitLab validates it only in the worker that runs the cleanup.
    older_than: Option<String>,
}

impl BulkDelete {
    /// Validates the parameters as GitLab does, with GitLab's Grape error bodies. The
    /// regexes are RE2-checked; `older_than` is a free string here (the worker parses it).
    pub fn new(
        name_regex_delete: Option<&str>,
        name_regex: Option<&str>,
        name_regex_keep: Option<&str>,
        keep_n: Option<i64>,
        older_than: Option<&str>,
    ) -> ApiResult<Self> {
        let delete_source = match (name_regex_delete, name_regex) {
            (Some(pattern), _) => ("name_regex_delete", pattern),
            (None, Some(pattern)) => ("name_regex", pattern),
            (None, None) => {
                return Err(ApiError::parameter(
                    "name_regex, name_regex_delete are missing, at least one parameter must be provided",
                ));
            }
        };
        let mut problems = Vec::new();
        let mut check = |param: &str, pattern: Option<&str>| -> Option<Regex> {
            let pattern = pattern?;
            match compile_anchored(pattern) {
                Ok(regex) => Some(regex),
                Err(message) => {
                    problems.push(format!("{param} is an invalid regexp: {message}"));
                    None
                }
            }
        };
        let alias = check("name_regex", name_regex);
        let delete = check("name_regex_delete", name_regex_delete).or(alias);
        let keep = check("name_regex_keep", name_regex_keep);
        if !problems.is_empty() {
            return Err(ApiError::parameter(problems.join(", ")));
        }
        let Some(delete) = delete else {
            return Err(ApiError::parameter(format!(
                "{} is an invalid regexp",
                delete_source.0
            )));
        };
        Ok(Self {
            delete,
            keep,
            keep_n,
            older_than: older_than.map(str::to_owned),
        })
    }
}

/// Compiles a cleanup regex the way GitLab's cleanup service applies it: RE2 syntax, anchored
/// by plain concatenation, `"\\A" + pattern + "\\z"`. So an alternation is not grouped:
/// `v1|v2` is `\Av1` or `v2\z`, and also matches `v1-rc`. The error is a one-line message
/// about the user's pattern.
pub fn compile_anchored(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(pattern).map_err(|error| regex_message(&error))?;
    Regex::new(&format!(r"\A{pattern}\z")).map_err(|error| regex_message(&error))
}

fn regex_message(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(|line| line.trim().trim_start_matches("error: ").to_owned())
        .unwrap_or(text)
}

/// Parses GitLab's human durations (`1h`, `1d`, `2d`, `1month`, `1 day`, `3 hours`,
/// `1d 12h`). Months are 30 days and years 365 days, as ChronicDuration counts them.
pub fn parse_human_duration(text: &str) -> Option<SignedDuration> {
    let part = Regex::new(r"(?i)^\s*(\d+)\s*([a-z]+)\s*").ok()?;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut seconds: i64 = 0;
    while !rest.is_empty() {
        let captures = part.captures(rest)?;
        let amount: i64 = captures.get(1)?.as_str().parse().ok()?;
        let unit = captures.get(2)?.as_str().to_ascii_lowercase();
        let unit_seconds: i64 = match unit.as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600,
            "d" | "day" | "days" => 86_400,
            "w" | "wk" | "wks" | "week" | "weeks" => 7 * 86_400,
            "mo" | "mon" | "mos" | "month" | "months" => 30 * 86_400,
            "y" | "yr" | "yrs" | "year" | "years" => 365 * 86_400,
            _ => return None,
        };
        seconds = seconds.checked_add(amount.checked_mul(unit_seconds)?)?;
        rest = &rest[captures.get(0)?.end()..];
    }
    Some(SignedDuration::from_secs(seconds))
}

/// Checks an upstream url as GitLab's model does. Returns the `url` error messages.
pub fn url_problems(url: &str, allow_local_network: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if url.chars().count() > 255 {
        problems.push("is too long (maximum is 255 characters)".to_owned());
    }
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(_) => {
            problems.push("is blocked: URI is invalid".to_owned());
            return problems;
        }
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        problems.push("is blocked: Only allowed schemes are http, https".to_owned());
        return problems;
    }
    let Some(host) = parsed.host() else {
        problems.push("is blocked: URI is invalid".to_owned());
        return problems;
    };
    if allow_local_network {
        return problems;
    }
    let blocked = match host {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost"))
                .then_some("is blocked: Requests to localhost are not allowed")
        }
        url::Host::Ipv4(ip) => ip_block_reason(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => ip_block_reason(IpAddr::V6(ip)),
    };
    if let Some(message) = blocked {
        problems.push(message.to_owned());
    }
    problems
}

fn ip_block_reason(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        IpAddr::V4(_) => ip,
    };
    if ip.is_loopback() || ip.is_unspecified() {
        return Some("is blocked: Requests to localhost are not allowed");
    }
    let (local, link_local) = match ip {
        IpAddr::V4(v4) => (is_private_v4(v4), v4.is_link_local()),
        IpAddr::V6(v6) => (is_unique_local_v6(v6), is_link_local_v6(v6)),
    };
    if link_local {
        Some("is blocked: Requests to the link local network are not allowed")
    } else if local {
        Some("is blocked: Requests to the local network are not allowed")
    } else {
        None
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || (a == 100 && (64..128).contains(&b))
}

fn is_unique_local_v6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xfe00) == 0xfc00
}

fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

fn too_long(errors: &mut ValidationErrors, attribute: &str, value: Option<&str>, max: usize) {
    if value.is_some_and(|text| text.chars().count() > max) {
        errors.add(
            attribute,
            &format!("is too long (maximum is {max} characters)"),
        );
    }
}

/// A blank username is no username (the model's presence rules treat it so).
fn non_blank(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_owned())
}

fn non_blank_secret(secret: &SecretString) -> Option<SecretString> {
    (!secret.expose_secret().trim().is_empty()).then(|| secret.clone())
}

/// The model's rules: `username` present if `password` is, and the reverse.
fn credential_presence_errors(
    errors: &mut ValidationErrors,
    username: Option<&str>,
    password: Option<&SecretString>,
) {
    let has_username = username.is_some_and(|name| !name.trim().is_empty());
    let has_password = password.is_some_and(|secret| !secret.expose_secret().trim().is_empty());
    if has_password && !has_username {
        errors.add("username", "can't be blank");
    }
    if has_username && !has_password {
        errors.add("password", "can't be blank");
    }
}

fn same_secret(left: Option<&SecretString>, right: Option<&SecretString>) -> bool {
    match (left, right) {
        (None, None) => true,
        (Some(left), Some(right)) => left.expose_secret() == right.expose_secret(),
        _ => false,
    }
}

#[derive(Debug, Clone, Serialize)]
struct IdCounters {
    group: u64,
    project: u64,
    repository: u64,
    protection_rule: u64,
    registry: u64,
    upstream: u64,
    association: u64,
    /// Next cache entry iid, per group.
    cache_entry_iid: BTreeMap<u64, u64>,
}

impl Default for IdCounters {
    fn default() -> Self {
        Self {
            group: 1,
            project: 1,
            repository: 1,
            protection_rule: 1,
            registry: 1,
            upstream: 1,
            association: 1,
            cache_entry_iid: BTreeMap::new(),
        }
    }
}

fn take_id(counter: &mut u64) -> u64 {
    let id = *counter;
    *counter += 1;
    id
}

/// Everything the simulator knows, as the `GET /-/sim/state` document shows it.
/// Passwords appear only as `has_password`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub now: Timestamp,
    pub clock_frozen: bool,
    pub groups: Vec<Group>,
    pub projects: Vec<Project>,
    pub repositories: Vec<Repository>,
    pub protection_rules: Vec<ProtectionRule>,
    pub registries: Vec<Registry>,
    pub upstreams: Vec<Upstream>,
    pub associations: Vec<Association>,
    pub cache_entries: Vec<SnapshotCacheEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotCacheEntry {
    pub id: String,
    #[serde(flatten)]
    pub entry: CacheEntry,
}

/// The simulated GitLab instance.
#[derive(Debug, Default, Clone)]
pub struct State {
    clock: Option<Timestamp>,
    groups: BTreeMap<u64, Group>,
    projects: BTreeMap<u64, Project>,
    repositories: BTreeMap<u64, Repository>,
    protection_rules: BTreeMap<u64, ProtectionRule>,
    registries: BTreeMap<u64, Registry>,
    upstreams: BTreeMap<u64, Upstream>,
    associations: BTreeMap<u64, Association>,
    cache_entries: BTreeMap<(u64, String), CacheEntry>,
    ids: IdCounters,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    // ---- clock -------------------------------------------------------------------------

    /// "Now" for every time rule: the frozen clock if one is set, else the wall clock.
    pub fn now(&self) -> Timestamp {
        self.clock.unwrap_or_else(Timestamp::now)
    }

    pub fn clock_frozen(&self) -> bool {
        self.clock.is_some()
    }

    /// Freezes the clock at `now`, or returns to the wall clock with `None`.
    pub fn set_clock(&mut self, now: Option<Timestamp>) {
        self.clock = now;
    }

    /// Moves the clock forward (freezing it if it was following the wall clock).
    pub fn advance_clock(&mut self, by: SignedDuration) -> ApiResult<Timestamp> {
        let next = self
            .now()
            .checked_add(by)
            .map_err(|_| ApiError::bad_request("clock out of range"))?;
        self.clock = Some(next);
        Ok(next)
    }

    // ---- lookups -----------------------------------------------------------------------

    /// A group by numeric id or full path (case-insensitive), else `404 Group Not Found`.
    pub fn group(&self, id_or_path: &str) -> ApiResult<&Group> {
        let found = match id_or_path.parse::<u64>() {
            Ok(id) => self.groups.get(&id),
            Err(_) => self
                .groups
                .values()
                .find(|group| group.full_path.eq_ignore_ascii_case(id_or_path)),
        };
        found.ok_or_else(|| ApiError::not_found_named("Group"))
    }

    /// A project by numeric id or full path, else `404 Project Not Found`.
    pub fn project(&self, id_or_path: &str) -> ApiResult<&Project> {
        let found = match id_or_path.parse::<u64>() {
            Ok(id) => self.projects.get(&id),
            Err(_) => self
                .projects
                .values()
                .find(|project| project.path_with_namespace.eq_ignore_ascii_case(id_or_path)),
        };
        found.ok_or_else(|| ApiError::not_found_named("Project"))
    }

    /// A top-level group for the registry and group upstream endpoints. A subgroup answers
    /// `404 {"message":"404 Not Found"}`: GitLab's permission check runs first and finds no
    /// virtual registry feature there.
    pub fn registry_group(&self, id_or_path: &str) -> ApiResult<&Group> {
        let group = self.group(id_or_path)?;
        if group.is_top_level() {
            Ok(group)
        } else {
            Err(ApiError {
                status: 404,
                body: json!({ "message": "404 Not Found" }),
            })
        }
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    // ---- virtual registries ------------------------------------------------------------

    pub fn registries_of_group(&self, group_id: u64) -> Vec<&Registry> {
        self.registries
            .values()
            .filter(|registry| registry.group_id == group_id)
            .collect()
    }

    pub fn registry(&self, id: u64) -> ApiResult<&Registry> {
        self.registries.get(&id).ok_or_else(ApiError::not_found)
    }

    pub fn create_registry(
        &mut self,
        group_id: u64,
        name: &str,
        description: Option<&str>,
    ) -> ApiResult<Registry> {
        let mut errors = ValidationErrors::default();
        too_long(&mut errors, "name", Some(name), 255);
        too_long(&mut errors, "description", description, 1024);
        let existing = self.registries_of_group(group_id);
        if existing.iter().any(|registry| registry.name == name) {
            errors.add("name", "has already been taken");
        }
        if existing.len() >= MAX_REGISTRIES_PER_GROUP {
            errors.add(
                "base",
                "5 registries is the maximum allowed per top-level group.",
            );
        }
        errors.into_result()?;
        let now = self.now();
        let registry = Registry {
            id: take_id(&mut self.ids.registry),
            group_id,
            name: name.to_owned(),
            description: description.map(str::to_owned),
            created_at: now,
            updated_at: now,
        };
        self.registries.insert(registry.id, registry.clone());
        Ok(registry)
    }

    pub fn update_registry(
        &mut self,
        id: u64,
        name: Option<&str>,
        description: Option<&str>,
    ) -> ApiResult<Registry> {
        let registry = self.registry(id)?;
        let mut errors = ValidationErrors::default();
        too_long(&mut errors, "name", name, 255);
        too_long(&mut errors, "description", description, 1024);
        if let Some(name) = name
            && self.registries.values().any(|other| {
                other.id != id && other.group_id == registry.group_id && other.name == name
            })
        {
            errors.add("name", "has already been taken");
        }
        errors.into_result()?;
        let now = self.now();
        let registry = self
            .registries
            .get_mut(&id)
            .ok_or_else(ApiError::not_found)?;
        if let Some(name) = name {
            registry.name = name.to_owned();
        }
        if let Some(description) = description {
            registry.description = Some(description.to_owned());
        }
        registry.updated_at = now;
        Ok(registry.clone())
    }

    /// Deletes a registry, its associations, and the upstreams no other registry uses
    /// (with their cache entries).
    pub fn delete_registry(&mut self, id: u64) -> ApiResult<()> {
        self.registry(id)?;
        let exclusive = self.exclusive_upstreams(id);
        self.associations
            .retain(|_, association| association.registry_id != id);
        for upstream_id in exclusive {
            self.remove_upstream_records(upstream_id);
        }
        self.registries.remove(&id);
        Ok(())
    }

    /// Deletes the cache entries of the registry's exclusive upstreams.
    pub fn purge_registry_cache(&mut self, id: u64) -> ApiResult<()> {
        self.registry(id)?;
        let exclusive: BTreeSet<u64> = self.exclusive_upstreams(id).into_iter().collect();
        self.cache_entries
            .retain(|(upstream_id, _), _| !exclusive.contains(upstream_id));
        Ok(())
    }

    fn exclusive_upstreams(&self, registry_id: u64) -> Vec<u64> {
        self.associations_of_registry(registry_id)
            .into_iter()
            .map(|association| association.upstream_id)
            .filter(|upstream_id| {
                self.associations.values().all(|other| {
                    other.upstream_id != *upstream_id || other.registry_id == registry_id
                })
            })
            .collect()
    }

    /// The registry's associations, by position.
    pub fn associations_of_registry(&self, registry_id: u64) -> Vec<&Association> {
        let mut list: Vec<&Association> = self
            .associations
            .values()
            .filter(|association| association.registry_id == registry_id)
            .collect();
        list.sort_by_key(|association| (association.position, association.id));
        list
    }

    pub fn associations_of_upstream(&self, upstream_id: u64) -> Vec<&Association> {
        self.associations
            .values()
            .filter(|association| association.upstream_id == upstream_id)
            .collect()
    }

    // ---- upstreams -----------------------------------------------------------------------

    pub fn upstream(&self, id: u64) -> ApiResult<&Upstream> {
        self.upstreams.get(&id).ok_or_else(ApiError::not_found)
    }

    /// The group's upstreams by id, filtered by a case-insensitive name substring.
    pub fn upstreams_of_group(&self, group_id: u64, name_filter: Option<&str>) -> Vec<&Upstream> {
        let needle = name_filter.map(str::to_lowercase);
        self.upstreams
            .values()
            .filter(|upstream| upstream.group_id == group_id)
            .filter(|upstream| {
                needle
                    .as_deref()
                    .is_none_or(|needle| upstream.name.to_lowercase().contains(needle))
            })
            .collect()
    }

    fn credentials_taken(
        &self,
        group_id: u64,
        url: &str,
        username: Option<&str>,
        password: Option<&SecretString>,
        except: Option<u64>,
    ) -> bool {
        self.upstreams.values().any(|other| {
            Some(other.id) != except
                && other.group_id == group_id
                && other.url == url
                && other.username.as_deref() == username
                && same_secret(other.password.as_ref(), password)
        })
    }

    fn upstream_field_errors(
        errors: &mut ValidationErrors,
        fields: &UpstreamChanges,
        allow_local_network: bool,
    ) {
        too_long(errors, "name", fields.name.as_deref(), 255);
        too_long(errors, "description", fields.description.as_deref(), 1024);
        if let Some(url) = &fields.url {
            for problem in url_problems(url, allow_local_network) {
                errors.add("url", &problem);
            }
        }
        too_long(errors, "username", fields.username.as_deref(), 510);
        too_long(
            errors,
            "password",
            fields
                .password
                .as_ref()
                .map(|secret| secret.expose_secret()),
            510,
        );
        if fields.cache_validity_hours.is_some_and(|hours| hours < 0) {
            errors.add("cache_validity_hours", "must be greater than or equal to 0");
        }
    }

    /// Creates an upstream in the registry's group and associates it at the next position.
    pub fn create_upstream(
        &mut self,
        registry_id: u64,
        input: NewUpstream,
        allow_local_network: bool,
    ) -> ApiResult<(Upstream, Association)> {
        self.create_upstream_at_read_position(registry_id, input, allow_local_network, None)
    }

    /// As [`create_upstream`](Self::create_upstream), with the association's position read
    /// earlier in the transaction (see
    /// [`associate_at_read_position`](Self::associate_at_read_position)): when the constraint
    /// fails, nothing is created.
    pub fn create_upstream_at_read_position(
        &mut self,
        registry_id: u64,
        input: NewUpstream,
        allow_local_network: bool,
        read_position: Option<i64>,
    ) -> ApiResult<(Upstream, Association)> {
        let group_id = self.registry(registry_id)?.group_id;
        let mut errors = ValidationErrors::default();
        let fields = UpstreamChanges {
            name: Some(input.name.clone()),
            description: input.description.clone(),
            url: Some(input.url.clone()),
            username: input.username.clone(),
            password: input.password.clone(),
            cache_validity_hours: input.cache_validity_hours,
        };
        Self::upstream_field_errors(&mut errors, &fields, allow_local_network);
        let input = NewUpstream {
            username: input.username.as_deref().and_then(non_blank),
            password: input.password.as_ref().and_then(non_blank_secret),
            ..input
        };
        credential_presence_errors(
            &mut errors,
            input.username.as_deref(),
            input.password.as_ref(),
        );
        if self.credentials_taken(
            group_id,
            &input.url,
            input.username.as_deref(),
            input.password.as_ref(),
            None,
        ) {
            errors.add("group", "already has an upstream with the same credentials");
        }
        let associated = self.associations_of_registry(registry_id);
        if associated.len() >= MAX_UPSTREAMS_PER_REGISTRY {
            errors.add(
                "registry_upstreams.position",
                "must be less than or equal to 5",
            );
        }
        errors.into_result()?;
        let position = commit_position(&associated, read_position)?;
        let now = self.now();
        let upstream = Upstream {
            id: take_id(&mut self.ids.upstream),
            group_id,
            name: input.name,
            description: input.description,
            url: input.url,
            username: input.username,
            password: input.password,
            cache_validity_hours: input.cache_validity_hours.unwrap_or(24),
            created_at: now,
            updated_at: now,
        };
        let association = Association {
            id: take_id(&mut self.ids.association),
            registry_id,
            upstream_id: upstream.id,
            position,
        };
        self.upstreams.insert(upstream.id, upstream.clone());
        self.associations
            .insert(association.id, association.clone());
        Ok((upstream, association))
    }

    /// Applies a PATCH (no all-or-none for the credentials: the model's presence rules
    /// apply). GitLab's `reset_credentials` runs after validation when the url changed: it
    /// clears username and password unless **both** changed in this request. Re-sending the
    /// stored values is no change, so they are cleared too.
    pub fn update_upstream(
        &mut self,
        id: u64,
        changes: UpstreamChanges,
        allow_local_network: bool,
    ) -> ApiResult<Upstream> {
        let current = self.upstream(id)?.clone();
        let url = changes.url.clone().unwrap_or_else(|| current.url.clone());
        let url_changed = url != current.url;
        let username = match &changes.username {
            Some(username) => non_blank(username),
            None => current.username.clone(),
        };
        let password = match &changes.password {
            Some(password) => non_blank_secret(password),
            None => current.password.clone(),
        };
        let username_changed = username != current.username;
        let password_changed = !same_secret(password.as_ref(), current.password.as_ref());
        let mut errors = ValidationErrors::default();
        Self::upstream_field_errors(&mut errors, &changes, allow_local_network);
        credential_presence_errors(&mut errors, username.as_deref(), password.as_ref());
        if (url_changed || username_changed || password_changed)
            && self.credentials_taken(
                current.group_id,
                &url,
                username.as_deref(),
                password.as_ref(),
                Some(id),
            )
        {
            errors.add("group", "already has an upstream with the same credentials");
        }
        errors.into_result()?;
        let (username, password) = if url_changed && !(username_changed && password_changed) {
            (None, None)
        } else {
            (username, password)
        };
        let now = self.now();
        let upstream = self
            .upstreams
            .get_mut(&id)
            .ok_or_else(ApiError::not_found)?;
        if let Some(name) = changes.name {
            upstream.name = name;
        }
        if let Some(description) = changes.description {
            upstream.description = Some(description);
        }
        if let Some(hours) = changes.cache_validity_hours {
            upstream.cache_validity_hours = hours;
        }
        upstream.url = url;
        upstream.username = username;
        upstream.password = password;
        upstream.updated_at = now;
        Ok(upstream.clone())
    }

    /// The model validations an unsaved upstream of the group runs before a connection test
    /// (`POST /groups/:id/-/virtual_registries/container/upstreams/test` builds one named
    /// `test`): url rules, credential presence, unique url and credentials in the group.
    pub fn validate_test_upstream(
        &self,
        group_id: u64,
        url: &str,
        username: Option<&str>,
        password: Option<&SecretString>,
        allow_local_network: bool,
    ) -> ApiResult<()> {
        let mut errors = ValidationErrors::default();
        let fields = UpstreamChanges {
            name: Some("test".into()),
            url: Some(url.to_owned()),
            username: username.map(str::to_owned),
            password: password.cloned(),
            ..UpstreamChanges::default()
        };
        Self::upstream_field_errors(&mut errors, &fields, allow_local_network);
        let username = username.and_then(non_blank);
        let password = password.and_then(non_blank_secret);
        credential_presence_errors(&mut errors, username.as_deref(), password.as_ref());
        if self.credentials_taken(group_id, url, username.as_deref(), password.as_ref(), None) {
            errors.add("group", "already has an upstream with the same credentials");
        }
        errors.into_result()
    }

    /// Deletes an upstream, its associations (renumbering every affected registry) and its
    /// cache entries.
    pub fn delete_upstream(&mut self, id: u64) -> ApiResult<()> {
        self.upstream(id)?;
        self.remove_upstream_records(id);
        Ok(())
    }

    fn remove_upstream_records(&mut self, upstream_id: u64) {
        let registries: BTreeSet<u64> = self
            .associations_of_upstream(upstream_id)
            .iter()
            .map(|association| association.registry_id)
            .collect();
        self.associations
            .retain(|_, association| association.upstream_id != upstream_id);
        for registry_id in registries {
            self.renumber(registry_id);
        }
        self.cache_entries
            .retain(|(entry_upstream, _), _| *entry_upstream != upstream_id);
        self.upstreams.remove(&upstream_id);
    }

    fn renumber(&mut self, registry_id: u64) {
        let order: Vec<u64> = self
            .associations_of_registry(registry_id)
            .iter()
            .map(|association| association.id)
            .collect();
        for (index, association_id) in order.into_iter().enumerate() {
            if let Some(association) = self.associations.get_mut(&association_id) {
                association.position = index as i64 + 1;
            }
        }
    }

    pub fn purge_upstream_cache(&mut self, id: u64) -> ApiResult<()> {
        self.upstream(id)?;
        self.cache_entries
            .retain(|(upstream_id, _), _| *upstream_id != id);
        Ok(())
    }

    // ---- associations ------------------------------------------------------------------

    pub fn association(&self, id: u64) -> ApiResult<&Association> {
        self.associations.get(&id).ok_or_else(ApiError::not_found)
    }

    pub fn associate(&mut self, registry_id: u64, upstream_id: u64) -> ApiResult<Association> {
        self.associate_at_read_position(registry_id, upstream_id, None)
    }

    /// The position the next association of registry `id` takes (highest + 1).
    pub fn next_association_position(&self, registry_id: u64) -> ApiResult<i64> {
        self.registry(registry_id)?;
        Ok(next_position(&self.associations_of_registry(registry_id)))
    }

    /// As [`associate`](Self::associate), committing at `read_position` when the position
    /// was read earlier in the transaction: taken by an insert committed since, the unique
    /// constraint fails this one.
    pub fn associate_at_read_position(
        &mut self,
        registry_id: u64,
        upstream_id: u64,
        read_position: Option<i64>,
    ) -> ApiResult<Association> {
        let group_id = self.registry(registry_id)?.group_id;
        match self.upstreams.get(&upstream_id) {
            Some(upstream) if upstream.group_id == group_id => {}
            _ => return Err(ApiError::not_found_named("Upstream")),
        }
        let associated = self.associations_of_registry(registry_id);
        let mut errors = ValidationErrors::default();
        if associated
            .iter()
            .any(|association| association.upstream_id == upstream_id)
        {
            errors.add("upstream_id", "has already been taken");
        }
        if associated.len() >= MAX_UPSTREAMS_PER_REGISTRY {
            errors.add("position", "must be less than or equal to 5");
        }
        errors.into_result()?;
        let position = commit_position(&associated, read_position)?;
        let association = Association {
            id: take_id(&mut self.ids.association),
            registry_id,
            upstream_id,
            position,
        };
        self.associations
            .insert(association.id, association.clone());
        Ok(association)
    }

    /// Moves an association to `position` (already checked to be 1..=20), capped at the
    /// registry's highest position; the ones in between shift by one. GitLab's
    /// `update_position` refuses positions above 5 and the API ignores that: for 6..=20
    /// nothing moves and the answer is still `200`.
    pub fn reposition(&mut self, id: u64, position: i64) -> ApiResult<Association> {
        let registry_id = self.association(id)?.registry_id;
        if position > MAX_UPSTREAMS_PER_REGISTRY as i64 {
            return self.association(id).cloned();
        }
        let mut order: Vec<u64> = self
            .associations_of_registry(registry_id)
            .iter()
            .map(|association| association.id)
            .filter(|association_id| *association_id != id)
            .collect();
        let index = usize::try_from(position.max(1) - 1)
            .unwrap_or(0)
            .min(order.len());
        order.insert(index, id);
        for (index, association_id) in order.into_iter().enumerate() {
            if let Some(association) = self.associations.get_mut(&association_id) {
                association.position = index as i64 + 1;
            }
        }
        self.association(id).cloned()
    }

    pub fn disassociate(&mut self, id: u64) -> ApiResult<()> {
        let registry_id = self.association(id)?.registry_id;
        self.associations.remove(&id);
        self.renumber(registry_id);
        Ok(())
    }

    // ---- cache entries -------------------------------------------------------------------

    /// The upstream's cache entries, newest first (`order_iid_desc`), filtered by a
    /// case-insensitive substring of the relative path.
    pub fn cache_entries_of_upstream(
        &self,
        upstream_id: u64,
        search: Option<&str>,
    ) -> ApiResult<Vec<&CacheEntry>> {
        self.upstream(upstream_id)?;
        let needle = search.map(str::to_lowercase);
        let mut entries: Vec<&CacheEntry> = self
            .cache_entries
            .range((upstream_id, String::new())..)
            .take_while(|((entry_upstream, _), _)| *entry_upstream == upstream_id)
            .map(|(_, entry)| entry)
            .filter(|entry| {
                needle
                    .as_deref()
                    .is_none_or(|needle| entry.relative_path.to_lowercase().contains(needle))
            })
            .collect();
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.iid));
        Ok(entries)
    }

    /// The path a connection test of an existing upstream probes: its first cached entry's
    /// (by relative path, the table's key order), if it has any.
    pub fn first_cached_path(&self, upstream_id: u64) -> Option<String> {
        self.cache_entries
            .range((upstream_id, String::new())..)
            .take_while(|((entry_upstream, _), _)| *entry_upstream == upstream_id)
            .map(|((_, path), _)| path.clone())
            .next()
    }

    /// Deletes the entry named by its id (url-safe base64 of `"<group_id> <iid>"`): a
    /// malformed id is a `400`, an unknown one `404`.
    pub fn delete_cache_entry(&mut self, encoded_id: &str) -> ApiResult<()> {
        let (group_id, iid) = decode_cache_entry_id(encoded_id)?;
        let key = self
            .cache_entries
            .iter()
            .find(|(_, entry)| entry.group_id == group_id && entry.iid == iid)
            .map(|(key, _)| key.clone())
            .ok_or_else(ApiError::not_found)?;
        self.cache_entries.remove(&key);
        Ok(())
    }

    /// Records a cached file for an upstream (used by seeds and tests). A new path gets the
    /// group's next iid; a path cached before keeps its iid.
    pub fn put_cache_entry(&mut self, mut entry: CacheEntry) -> ApiResult<()> {
        self.upstream(entry.upstream_id)?;
        let key = (entry.upstream_id, entry.relative_path.clone());
        entry.iid = match self.cache_entries.get(&key) {
            Some(existing) => existing.iid,
            None => {
                let counter = self.ids.cache_entry_iid.entry(entry.group_id).or_insert(1);
                take_id(counter)
            }
        };
        self.cache_entries.insert(key, entry);
        Ok(())
    }

    // ---- container registry --------------------------------------------------------------

    pub fn project_by_id(&self, id: u64) -> Option<&Project> {
        self.projects.get(&id)
    }

    pub fn repositories_of_project(&self, project_id: u64) -> Vec<&Repository> {
        self.repositories
            .values()
            .filter(|repository| repository.project_id == project_id)
            .collect()
    }

    /// Projects of the group (and of its subgroups with `include_subgroups`), by id.
    pub fn projects_of_group(&self, group_id: u64, include_subgroups: bool) -> Vec<&Project> {
        let groups = self.group_and_subgroups(group_id, include_subgroups);
        self.projects
            .values()
            .filter(|project| groups.contains(&project.namespace_id))
            .collect()
    }

    fn group_and_subgroups(&self, group_id: u64, include_subgroups: bool) -> BTreeSet<u64> {
        let Some(group) = self.groups.get(&group_id) else {
            return BTreeSet::new();
        };
        let prefix = format!("{}/", group.full_path);
        self.groups
            .values()
            .filter(|candidate| {
                candidate.id == group_id
                    || (include_subgroups && candidate.full_path.starts_with(&prefix))
            })
            .map(|candidate| candidate.id)
            .collect()
    }

    /// Repositories of every project in the group and its subgroups.
    pub fn repositories_of_group(&self, group_id: u64) -> Vec<&Repository> {
        let groups = self.group_and_subgroups(group_id, true);
        self.repositories
            .values()
            .filter(|repository| {
                self.projects
                    .get(&repository.project_id)
                    .is_some_and(|project| groups.contains(&project.namespace_id))
            })
            .collect()
    }

    pub fn repository(&self, id: u64) -> ApiResult<&Repository> {
        self.repositories.get(&id).ok_or_else(ApiError::not_found)
    }

    /// A repository of the given project; another project's repository is `404`.
    pub fn project_repository(&self, project_id: u64, id: u64) -> ApiResult<&Repository> {
        self.repositories
            .get(&id)
            .filter(|repository| repository.project_id == project_id)
            .ok_or_else(ApiError::not_found)
    }

    pub fn delete_repository(&mut self, project_id: u64, id: u64) -> ApiResult<()> {
        self.project_repository(project_id, id)?;
        self.repositories.remove(&id);
        Ok(())
    }

    pub fn tag(&self, project_id: u64, repository_id: u64, name: &str) -> ApiResult<&Tag> {
        self.project_repository(project_id, repository_id)?
            .tags
            .get(name)
            .ok_or_else(|| ApiError::not_found_named("Tag"))
    }

    /// `DELETE /projects/:id/repository/branches/:branch`: `404 Branch Not Found` when absent.
    pub fn delete_branch(&mut self, project_id: u64, branch: &str) -> ApiResult<()> {
        let project = self
            .projects
            .get_mut(&project_id)
            .ok_or_else(|| ApiError::not_found_named("Project"))?;
        if project.branches.remove(branch) {
            Ok(())
        } else {
            Err(ApiError::not_found_named("Branch"))
        }
    }

    pub fn protection_rules_of_project(&self, project_id: u64) -> Vec<&ProtectionRule> {
        self.protection_rules
            .values()
            .filter(|rule| rule.project_id == project_id)
            .collect()
    }

    /// Whether a rule forbids `role` to delete the tag. Patterns match anywhere (unanchored).
    pub fn is_protected(&self, project_id: u64, tag_name: &str, role: AccessLevel) -> bool {
        self.protection_rules_of_project(project_id)
            .into_iter()
            .filter(|rule| rule.minimum_access_level_for_delete > role)
            .any(|rule| {
                Regex::new(&rule.tag_name_pattern).is_ok_and(|regex| regex.is_match(tag_name))
            })
    }

    pub fn delete_tag(
        &mut self,
        project_id: u64,
        repository_id: u64,
        name: &str,
        role: AccessLevel,
    ) -> ApiResult<()> {
        // Developer or higher may delete tags. A tag a protection rule covers for the
        // caller's role is refused by policy before the delete service runs, with the plain
        // `403 Forbidden` (the `- cannot delete protected tag(s)` text is the service's).
        if role < AccessLevel::Developer || self.is_protected(project_id, name, role) {
            return Err(ApiError::forbidden());
        }
        // GitLab does not look the tag up first (INFERRED: a missing tag fails the service
        // with a 400); the simulator keeps the `404 Tag Not Found` of the tag routes.
        self.tag(project_id, repository_id, name)?;
        if let Some(repository) = self.repositories.get_mut(&repository_id) {
            repository.tags.remove(name);
        }
        Ok(())
    }

    /// Runs a bulk tag delete now (GitLab queues it; the outcome is the same) and returns the
    /// deleted tag names. A second call for the repository within an hour is a `400`. GitLab
    /// applies `keep_n` per batch of 1,000 tags; the simulator applies it to the whole list,
    /// which is the same below 1,000 tags.
    pub fn bulk_delete_tags(
        &mut self,
        project_id: u64,
        repository_id: u64,
        request: &BulkDelete,
        role: AccessLevel,
    ) -> ApiResult<Vec<String>> {
        let now = self.now();
        let repository = self.project_repository(project_id, repository_id)?;
        if let Some(last) = repository.last_bulk_delete_at
            && now.duration_since(last) < SignedDuration::from_hours(1)
        {
            return Err(ApiError::bad_request(
                "This request has already been made. You can run this at most once an hour for a given container repository",
            ));
        }
        let mut candidates: Vec<&Tag> = repository
            .tags
            .values()
            .filter(|tag| tag.name != "latest")
            .filter(|tag| request.delete.is_match(&tag.name))
            .filter(|tag| {
                !request
                    .keep
                    .as_ref()
                    .is_some_and(|keep| keep.is_match(&tag.name))
            })
            .collect();
        // GitLab orders by `updated_at || created_at`, newest first, and a tag without a
        // time counts as now: the newest, so `keep_n` spares it first.
        candidates.sort_by_key(|tag| std::cmp::Reverse(tag.created_at.unwrap_or(now)));
        let keep_n = request
            .keep_n
            .map(|keep| usize::try_from(keep).unwrap_or(0))
            .unwrap_or(0);
        // `older_than` is parsed by the worker, after the request was accepted: a value it
        // cannot parse fails the worker, so nothing is deleted (INFERRED), and the hourly
        // lock is taken all the same.
        let cutoff = match &request.older_than {
            None => Ok(None),
            Some(text) => parse_human_duration(text)
                .map(|age| now.checked_sub(age).ok())
                .ok_or(()),
        };
        let doomed: Vec<String> = match cutoff {
            Err(()) => Vec::new(),
            Ok(cutoff) => candidates
                .into_iter()
                .skip(keep_n)
                .filter(|tag| match cutoff {
                    Some(cutoff) => tag.created_at.unwrap_or(now) < cutoff,
                    None => true,
                })
                .map(|tag| tag.name.clone())
                .filter(|name| !self.is_protected(project_id, name, role))
                .collect(),
        };
        if let Some(repository) = self.repositories.get_mut(&repository_id) {
            for name in &doomed {
                repository.tags.remove(name);
            }
            repository.last_bulk_delete_at = Some(now);
        }
        Ok(doomed)
    }

    /// Adds or replaces a tag (a push, or a test setting a tag's creation time).
    pub fn put_tag(&mut self, repository_id: u64, tag: Tag) -> ApiResult<()> {
        let repository = self
            .repositories
            .get_mut(&repository_id)
            .ok_or_else(ApiError::not_found)?;
        repository.tags.insert(tag.name.clone(), tag);
        Ok(())
    }

    /// `PUT /projects/:id`: registry access level and the container expiration policy.
    pub fn update_project(
        &mut self,
        project_id: u64,
        access_level: Option<&str>,
        policy_attributes: Option<&serde_json::Map<String, Value>>,
    ) -> ApiResult<Project> {
        let now = self.now();
        let project = self
            .projects
            .get(&project_id)
            .ok_or_else(|| ApiError::not_found_named("Project"))?;
        if let Some(level) = access_level
            && !ACCESS_LEVELS.contains(&level)
        {
            return Err(ApiError::parameter(
                "container_registry_access_level does not have a valid value",
            ));
        }
        let policy = match policy_attributes {
            Some(attributes) => Some(apply_policy_attributes(
                &project.container_expiration_policy,
                attributes,
                now,
            )?),
            None => None,
        };
        let project = self
            .projects
            .get_mut(&project_id)
            .ok_or_else(|| ApiError::not_found_named("Project"))?;
        if let Some(level) = access_level {
            project.container_registry_access_level = level.to_owned();
        }
        if let Some(policy) = policy {
            project.container_expiration_policy = policy;
        }
        Ok(project.clone())
    }

    // ---- seeding and inspection --------------------------------------------------------

    /// Adds a seed's records, all or nothing. Ids given by the seed are kept; the id
    /// counters move past them so later creations never collide.
    pub fn apply_seed(&mut self, seed: &Seed) -> std::result::Result<(), SeedError> {
        let mut next = self.clone();
        let now = next.now();
        next.seed_groups(seed)?;
        next.seed_projects(seed, now)?;
        next.seed_registries(seed, now)?;
        next.seed_upstreams(seed, now)?;
        *self = next;
        Ok(())
    }

    fn seed_groups(&mut self, seed: &Seed) -> std::result::Result<(), SeedError> {
        let mut groups: Vec<_> = seed.groups.iter().collect();
        groups.sort_by_key(|group| group.full_path.matches('/').count());
        for group in groups {
            if self.groups.contains_key(&group.id)
                || self.group(&group.full_path).is_ok()
                || group.full_path.is_empty()
            {
                return Err(SeedError::Duplicate(format!("group {}", group.full_path)));
            }
            let parent_id = match group.full_path.rsplit_once('/') {
                Some((parent, _)) => Some(
                    self.group(parent)
                        .map_err(|_| SeedError::Unknown(format!("parent group {parent}")))?
                        .id,
                ),
                None => None,
            };
            let path = group
                .full_path
                .rsplit('/')
                .next()
                .unwrap_or(&group.full_path);
            self.groups.insert(
                group.id,
                Group {
                    id: group.id,
                    name: group.name.clone().unwrap_or_else(|| path.to_owned()),
                    full_path: group.full_path.clone(),
                    parent_id,
                },
            );
            self.ids.group = self.ids.group.max(group.id + 1);
        }
        Ok(())
    }

    fn seed_projects(&mut self, seed: &Seed, now: Timestamp) -> std::result::Result<(), SeedError> {
        for project in &seed.projects {
            let Some((namespace, path)) = project.path_with_namespace.rsplit_once('/') else {
                return Err(SeedError::Invalid(format!(
                    "project {} has no group",
                    project.path_with_namespace
                )));
            };
            if self.projects.contains_key(&project.id)
                || self.project(&project.path_with_namespace).is_ok()
            {
                return Err(SeedError::Duplicate(format!(
                    "project {}",
                    project.path_with_namespace
                )));
            }
            let namespace_id = self
                .group(namespace)
                .map_err(|_| SeedError::Unknown(format!("group {namespace}")))?
                .id;
            self.projects.insert(
                project.id,
                Project {
                    id: project.id,
                    name: path.to_owned(),
                    path: path.to_owned(),
                    path_with_namespace: project.path_with_namespace.clone(),
                    namespace_id,
                    created_at: now,
                    container_registry_access_level: "enabled".into(),
                    container_expiration_policy: ExpirationPolicy::default(),
                    branches: project.branches.iter().cloned().collect(),
                },
            );
            self.ids.project = self.ids.project.max(project.id + 1);
            for repository in &project.repositories {
                let id = match repository.id {
                    Some(id) if self.repositories.contains_key(&id) => {
                        return Err(SeedError::Duplicate(format!("repository {id}")));
                    }
                    Some(id) => id,
                    None => self.ids.repository,
                };
                self.ids.repository = self.ids.repository.max(id + 1);
                let path = if repository.name.is_empty() {
                    project.path_with_namespace.clone()
                } else {
                    format!("{}/{}", project.path_with_namespace, repository.name)
                };
                let tags = repository
                    .tags
                    .iter()
                    .map(|tag| {
                        (
                            tag.name.clone(),
                            Tag {
                                name: tag.name.clone(),
                                digest: tag.digest.clone(),
                                created_at: tag.created_at,
                                total_size: tag.total_size,
                            },
                        )
                    })
                    .collect();
                self.repositories.insert(
                    id,
                    Repository {
                        id,
                        project_id: project.id,
                        name: repository.name.clone(),
                        path,
                        created_at: repository.created_at.unwrap_or(now),
                        cleanup_policy_started_at: None,
                        tags,
                        last_bulk_delete_at: None,
                    },
                );
            }
            if project.tag_protection_rules.len() > MAX_PROTECTION_RULES_PER_PROJECT {
                return Err(SeedError::Invalid(format!(
                    "project {} has more than {MAX_PROTECTION_RULES_PER_PROJECT} tag protection rules",
                    project.path_with_namespace
                )));
            }
            for rule in &project.tag_protection_rules {
                Regex::new(&rule.tag_name_pattern).map_err(|error| {
                    SeedError::Invalid(format!("tag_name_pattern: {}", regex_message(&error)))
                })?;
                let id = take_id(&mut self.ids.protection_rule);
                self.protection_rules.insert(
                    id,
                    ProtectionRule {
                        id,
                        project_id: project.id,
                        tag_name_pattern: rule.tag_name_pattern.clone(),
                        minimum_access_level_for_push: rule.minimum_access_level_for_push,
                        minimum_access_level_for_delete: rule.minimum_access_level_for_delete,
                    },
                );
            }
        }
        Ok(())
    }

    fn seed_registries(
        &mut self,
        seed: &Seed,
        now: Timestamp,
    ) -> std::result::Result<(), SeedError> {
        for registry in &seed.registries {
            let group_id = self.seed_group(&registry.group)?;
            let id = registry.id.unwrap_or(self.ids.registry);
            if self.registries.contains_key(&id)
                || self
                    .registries_of_group(group_id)
                    .iter()
                    .any(|existing| existing.name == registry.name)
            {
                return Err(SeedError::Duplicate(format!("registry {}", registry.name)));
            }
            self.ids.registry = self.ids.registry.max(id + 1);
            self.registries.insert(
                id,
                Registry {
                    id,
                    group_id,
                    name: registry.name.clone(),
                    description: registry.description.clone(),
                    created_at: now,
                    updated_at: now,
                },
            );
        }
        Ok(())
    }

    fn seed_upstreams(
        &mut self,
        seed: &Seed,
        now: Timestamp,
    ) -> std::result::Result<(), SeedError> {
        for upstream in &seed.upstreams {
            let group_id = self.seed_group(&upstream.group)?;
            let id = upstream.id.unwrap_or(self.ids.upstream);
            if self.upstreams.contains_key(&id) {
                return Err(SeedError::Duplicate(format!("upstream {id}")));
            }
            self.ids.upstream = self.ids.upstream.max(id + 1);
            self.upstreams.insert(
                id,
                Upstream {
                    id,
                    group_id,
                    name: upstream.name.clone(),
                    description: upstream.description.clone(),
                    url: upstream.url.clone(),
                    username: upstream.username.clone(),
                    password: upstream.password.clone(),
                    cache_validity_hours: upstream.cache_validity_hours.unwrap_or(24),
                    created_at: now,
                    updated_at: now,
                },
            );
            for registry_name in &upstream.registries {
                let registry_id = self
                    .registries_of_group(group_id)
                    .iter()
                    .find(|registry| registry.name == *registry_name)
                    .map(|registry| registry.id)
                    .ok_or_else(|| SeedError::Unknown(format!("registry {registry_name}")))?;
                self.associate(registry_id, id)
                    .map_err(|error| SeedError::Invalid(error.body.to_string()))?;
            }
            for entry in &upstream.cache_entries {
                let created_at = entry.created_at.unwrap_or(now);
                let downloaded_at = entry.downloaded_at.unwrap_or(created_at);
                let fingerprint = pseudo_hex(&format!("{id} {}", entry.relative_path), 40);
                self.put_cache_entry(CacheEntry {
                    group_id,
                    iid: 0,
                    upstream_id: id,
                    relative_path: entry.relative_path.clone(),
                    upstream_checked_at: downloaded_at,
                    file_sha1: fingerprint,
                    size: entry.size.unwrap_or(2048),
                    content_type: entry.content_type.clone().unwrap_or_else(|| {
                        "application/vnd.docker.distribution.manifest.v2+json".into()
                    }),
                    upstream_etag: format!("\"{}\"", pseudo_hex(&entry.relative_path, 18)),
                    created_at,
                    updated_at: downloaded_at,
                    downloads_count: entry.downloads_count.unwrap_or(1),
                    downloaded_at,
                })
                .map_err(|error| SeedError::Invalid(error.body.to_string()))?;
            }
        }
        Ok(())
    }

    fn seed_group(&self, group: &GroupRef) -> std::result::Result<u64, SeedError> {
        let key = match group {
            GroupRef::Id(id) => id.to_string(),
            GroupRef::Path(path) => path.clone(),
        };
        let group = self
            .group(&key)
            .map_err(|_| SeedError::Unknown(format!("group {key}")))?;
        if group.is_top_level() {
            Ok(group.id)
        } else {
            Err(SeedError::Invalid(format!(
                "group {key} is not a top-level group"
            )))
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            now: self.now(),
            clock_frozen: self.clock.is_some(),
            groups: self.groups.values().cloned().collect(),
            projects: self.projects.values().cloned().collect(),
            repositories: self.repositories.values().cloned().collect(),
            protection_rules: self.protection_rules.values().cloned().collect(),
            registries: self.registries.values().cloned().collect(),
            upstreams: self.upstreams.values().cloned().collect(),
            associations: self.associations.values().cloned().collect(),
            cache_entries: self
                .cache_entries
                .values()
                .map(|entry| SnapshotCacheEntry {
                    id: entry.id(),
                    entry: entry.clone(),
                })
                .collect(),
        }
    }
}

/// The position a new association commits at: the one read earlier in its transaction,
/// unless an insert committed since holds it; else the next one.
fn commit_position(associated: &[&Association], read_position: Option<i64>) -> ApiResult<i64> {
    match read_position {
        Some(position) if associated.iter().any(|held| held.position == position) => {
            Err(ApiError::internal())
        }
        Some(position) => Ok(position),
        None => Ok(next_position(associated)),
    }
}

fn next_position(associated: &[&Association]) -> i64 {
    associated
        .iter()
        .map(|association| association.position)
        .max()
        .unwrap_or(0)
        + 1
}

/// Deterministic hex text derived from `seed` (digests and checksums for demo data).
pub fn pseudo_hex(seed: &str, length: usize) -> String {
    let mut out = String::with_capacity(length);
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes() {
        state = (state ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    while out.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push_str(&format!("{state:016x}"));
    }
    out.truncate(length);
    out
}

fn apply_policy_attributes(
    current: &ExpirationPolicy,
    attributes: &serde_json::Map<String, Value>,
    now: Timestamp,
) -> ApiResult<ExpirationPolicy> {
    let invalid = |key: &str| {
        ApiError::parameter(format!(
            "container_expiration_policy_attributes[{key}] is invalid"
        ))
    };
    let mut policy = current.clone();
    let mut errors = ValidationErrors::default();
    let not_in_list = "is not included in the list";
    if let Some(value) = attributes.get("cadence") {
        let cadence = value.as_str().ok_or_else(|| invalid("cadence"))?;
        if CADENCES.contains(&cadence) {
            policy.cadence = cadence.to_owned();
        } else {
            errors.add("container_expiration_policy.cadence", not_in_list);
        }
    }
    if let Some(value) = attributes.get("enabled") {
        policy.enabled = match value {
            Value::Bool(flag) => *flag,
            Value::String(text) if text == "true" => true,
            Value::String(text) if text == "false" => false,
            _ => return Err(invalid("enabled")),
        };
    }
    if let Some(value) = attributes.get("keep_n") {
        let keep_n = match value {
            Value::Null => None,
            Value::Number(number) => Some(number.as_i64().ok_or_else(|| invalid("keep_n"))?),
            Value::String(text) => Some(text.parse().map_err(|_| invalid("keep_n"))?),
            _ => return Err(invalid("keep_n")),
        };
        if keep_n.is_none_or(|keep| POLICY_KEEP_N.contains(&keep)) {
            policy.keep_n = keep_n;
        } else {
            errors.add("container_expiration_policy.keep_n", not_in_list);
        }
    }
    if let Some(value) = attributes.get("older_than") {
        let older_than = match value {
            Value::Null => None,
            Value::String(text) => Some(text.as_str()),
            _ => return Err(invalid("older_than")),
        };
        if older_than.is_none_or(|age| POLICY_OLDER_THAN.contains(&age)) {
            policy.older_than = older_than.map(str::to_owned);
        } else {
            errors.add("container_expiration_policy.older_than", not_in_list);
        }
    }
    let regex_field = |key: &str| -> ApiResult<Option<Option<String>>> {
        match attributes.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(text)) => Ok(Some(Some(text.clone()))),
            Some(_) => Err(invalid(key)),
        }
    };
    let name_regex = regex_field("name_regex")?;
    let name_regex_delete = regex_field("name_regex_delete")?;
    if let Some(pattern) = name_regex_delete.or(name_regex) {
        policy.name_regex = pattern;
    }
    if let Some(pattern) = regex_field("name_regex_keep")? {
        policy.name_regex_keep = pattern;
    }
    // GitLab validates the regexes (and requires `name_regex`) only on an enabled policy: a
    // disabled one keeps whatever it is given.
    for (attribute, pattern) in [
        ("name_regex", &policy.name_regex),
        ("name_regex_keep", &policy.name_regex_keep),
    ] {
        if policy.enabled
            && let Some(pattern) = pattern
            && let Err(error) = Regex::new(pattern)
        {
            errors.add(
                &format!("container_expiration_policy.{attribute}"),
                &format!("not valid RE2 syntax: {}", regex_message(&error)),
            );
        }
    }
    if policy.enabled && policy.name_regex.as_deref().is_none_or(str::is_empty) {
        errors.add("container_expiration_policy.name_regex", "can't be blank");
    }
    errors.into_result()?;
    policy.next_run_at = if policy.enabled {
        Some(next_run(now, &policy.cadence))
    } else {
        None
    };
    Ok(policy)
}

/// The next run of a policy saved at `now`: one cadence ahead, months counted as 30 days
/// (INFERRED from ChronicDuration's month).
fn next_run(now: Timestamp, cadence: &str) -> Timestamp {
    let days: i64 = match cadence {
        "7d" => 7,
        "14d" => 14,
        "1month" => 30,
        "3month" => 90,
        _ => 1,
    };
    now.checked_add(SignedDuration::from_hours(24 * days))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::seed::{SeedGroup, SeedProject, SeedRepository, SeedTag};

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn state_with_groups() -> State {
        let mut state = State::new();
        state.set_clock(Some(ts("2025-01-01T00:00:00Z")));
        let seed = Seed {
            groups: vec![
                SeedGroup {
                    id: 10,
                    full_path: "org".into(),
                    name: None,
                },
                SeedGroup {
                    id: 11,
                    full_path: "org/sub".into(),
                    name: None,
                },
                SeedGroup {
                    id: 20,
                    full_path: "other".into(),
                    name: None,
                },
            ],
            ..Seed::default()
        };
        state.apply_seed(&seed).unwrap();
        state
    }

    fn upstream(name: &str, url: &str) -> NewUpstream {
        NewUpstream {
            name: name.into(),
            url: url.into(),
            ..NewUpstream::default()
        }
    }

    #[test]
    fn groups_resolve_by_id_or_path_and_subgroups_are_refused() {
        let state = state_with_groups();
        assert_eq!(state.group("10").unwrap().full_path, "org");
        assert_eq!(state.group("org/sub").unwrap().id, 11);
        assert_eq!(state.group("nope").unwrap_err().status, 404);
        let error = state.registry_group("org/sub").unwrap_err();
        assert_eq!(
            (error.status, error.body),
            (404, json!({"message": "404 Not Found"}))
        );
        assert_eq!(state.registry_group("11").unwrap_err().status, 404);
    }

    #[test]
    fn registry_limits_and_uniqueness() {
        let mut state = state_with_groups();
        for index in 0..5 {
            state
                .create_registry(10, &format!("r{index}"), None)
                .unwrap();
        }
        let error = state.create_registry(10, "r5", None).unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"base": ["5 registries is the maximum allowed per top-level group."]}})
        );
        let error = state
            .create_registry(20, &"x".repeat(256), None)
            .unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"name": ["is too long (maximum is 255 characters)"]}})
        );
        state.create_registry(20, "dup", None).unwrap();
        let error = state.create_registry(20, "dup", None).unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"name": ["has already been taken"]}})
        );
        let error = state
            .create_registry(20, "desc", Some(&"d".repeat(1025)))
            .unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"description": ["is too long (maximum is 1024 characters)"]}})
        );
    }

    #[test]
    fn upstream_positions_limits_and_renumbering() {
        let mut state = state_with_groups();
        let first = state.create_registry(10, "first", None).unwrap();
        let second = state.create_registry(10, "second", None).unwrap();
        let mut ids = Vec::new();
        for index in 0..5 {
            let (created, association) = state
                .create_upstream(
                    first.id,
                    upstream(
                        &format!("u{index}"),
                        &format!("https://u{index}.example.com"),
                    ),
                    false,
                )
                .unwrap();
            assert_eq!(association.position, index + 1);
            ids.push(created.id);
        }
        let error = state
            .create_upstream(first.id, upstream("u6", "https://u6.example.com"), false)
            .unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"registry_upstreams.position": ["must be less than or equal to 5"]}})
        );
        // Share u1 and u3 with the second registry.
        let shared_a = state.associate(second.id, ids[1]).unwrap();
        state.associate(second.id, ids[3]).unwrap();
        assert_eq!(shared_a.position, 1);
        let error = state.associate(second.id, ids[1]).unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"upstream_id": ["has already been taken"]}})
        );
        // Move u4 (position 5) to 2: u1..u3 shift down by one.
        let moved = state.associations_of_registry(first.id)[4].id;
        state.reposition(moved, 2).unwrap();
        let order: Vec<u64> = state
            .associations_of_registry(first.id)
            .iter()
            .map(|association| association.upstream_id)
            .collect();
        assert_eq!(order, vec![ids[0], ids[4], ids[1], ids[2], ids[3]]);
        // 6..=20 moves nothing; 1..=5 beyond the highest is capped.
        let head = state.associations_of_registry(first.id)[0].id;
        assert_eq!(state.reposition(head, 20).unwrap().position, 1);
        state
            .disassociate(state.associations_of_registry(first.id)[4].id)
            .unwrap();
        assert_eq!(state.reposition(head, 5).unwrap().position, 4);
        state.reposition(head, 1).unwrap();
        state.associate(first.id, ids[3]).unwrap();
        // Deleting u1 renumbers both registries.
        state.delete_upstream(ids[1]).unwrap();
        let positions: Vec<i64> = state
            .associations_of_registry(first.id)
            .iter()
            .map(|association| association.position)
            .collect();
        assert_eq!(positions, vec![1, 2, 3, 4]);
        let second_list = state.associations_of_registry(second.id);
        assert_eq!(second_list.len(), 1);
        assert_eq!(second_list[0].position, 1);
        assert_eq!(second_list[0].upstream_id, ids[3]);
        // Deleting the first registry removes its exclusive upstreams only.
        state.delete_registry(first.id).unwrap();
        assert!(state.upstream(ids[3]).is_ok());
        assert!(state.upstream(ids[0]).is_err());
        assert!(state.upstream(ids[4]).is_err());
    }

    #[test]
    fn other_groups_upstream_is_not_found() {
        let mut state = state_with_groups();
        let mine = state.create_registry(10, "mine", None).unwrap();
        let theirs = state.create_registry(20, "theirs", None).unwrap();
        let (foreign, _) = state
            .create_upstream(theirs.id, upstream("f", "https://f.example.com"), false)
            .unwrap();
        let error = state.associate(mine.id, foreign.id).unwrap_err();
        assert_eq!(error.status, 404);
        assert_eq!(error.body, json!({"message": "404 Upstream Not Found"}));
    }

    #[test]
    fn credentials_are_unique_and_cleared_by_url_change() {
        let mut state = state_with_groups();
        let registry = state.create_registry(10, "r", None).unwrap();
        let with_credentials = NewUpstream {
            username: Some("user".into()),
            password: Some("secret".into()),
            ..upstream("a", "https://registry.example.com")
        };
        let (first, _) = state
            .create_upstream(registry.id, with_credentials.clone(), false)
            .unwrap();
        let error = state
            .create_upstream(registry.id, with_credentials, false)
            .unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"group": ["already has an upstream with the same credentials"]}})
        );
        let changed = state
            .update_upstream(
                first.id,
                UpstreamChanges {
                    url: Some("https://other.example.com".into()),
                    ..UpstreamChanges::default()
                },
                false,
            )
            .unwrap();
        assert_eq!(changed.username, None);
        assert!(changed.password.is_none());
        let serialized = serde_json::to_value(&changed).unwrap();
        assert_eq!(serialized["has_password"], json!(false));
        assert!(serialized.get("password").is_none());

        let set = |username: &str, password: &str| UpstreamChanges {
            username: Some(username.into()),
            password: Some(password.into()),
            ..UpstreamChanges::default()
        };
        state
            .update_upstream(first.id, set("user", "secret"), false)
            .unwrap();
        let moved = |url: &str, username: &str, password: &str| UpstreamChanges {
            url: Some(url.into()),
            ..set(username, password)
        };
        // The same values re-sent with the url are no change: cleared.
        let resent = state
            .update_upstream(
                first.id,
                moved("https://third.example.com", "user", "secret"),
                false,
            )
            .unwrap();
        assert_eq!((resent.username, resent.password.is_some()), (None, false));
        state
            .update_upstream(first.id, set("user", "secret"), false)
            .unwrap();
        // Only the password changed: cleared too.
        let half = state
            .update_upstream(
                first.id,
                moved("https://fourth.example.com", "user", "other"),
                false,
            )
            .unwrap();
        assert_eq!(half.username, None);
        state
            .update_upstream(first.id, set("user", "secret"), false)
            .unwrap();
        // Both changed in the same request: kept.
        let both = state
            .update_upstream(
                first.id,
                moved("https://fifth.example.com", "robot", "other"),
                false,
            )
            .unwrap();
        assert_eq!(both.username.as_deref(), Some("robot"));
        assert!(both.password.is_some());
        // No all-or-none, but the model's presence rules.
        let lone_username = UpstreamChanges {
            username: Some("bot".into()),
            ..UpstreamChanges::default()
        };
        assert_eq!(
            state
                .update_upstream(first.id, lone_username, false)
                .unwrap()
                .username
                .as_deref(),
            Some("bot")
        );
        let error = state
            .update_upstream(first.id, set("", "secret"), false)
            .unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"username": ["can't be blank"]}})
        );
    }

    #[test]
    fn url_rules() {
        assert_eq!(
            url_problems("http://localhost:5000", false),
            vec!["is blocked: Requests to localhost are not allowed"]
        );
        assert_eq!(
            url_problems("http://127.0.0.1:5000", false),
            vec!["is blocked: Requests to localhost are not allowed"]
        );
        assert_eq!(
            url_problems("https://10.1.2.3", false),
            vec!["is blocked: Requests to the local network are not allowed"]
        );
        assert!(url_problems("http://127.0.0.1:5000", true).is_empty());
        assert_eq!(
            url_problems("ftp://example.com", false),
            vec!["is blocked: Only allowed schemes are http, https"]
        );
        assert!(url_problems("https://registry-1.docker.io", false).is_empty());
        let long = format!("https://example.com/{}", "a".repeat(240));
        assert_eq!(
            url_problems(&long, false),
            vec!["is too long (maximum is 255 characters)"]
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(
            parse_human_duration("1h"),
            Some(SignedDuration::from_hours(1))
        );
        assert_eq!(
            parse_human_duration("2d"),
            Some(SignedDuration::from_hours(48))
        );
        assert_eq!(
            parse_human_duration("1 day"),
            Some(SignedDuration::from_hours(24))
        );
        assert_eq!(
            parse_human_duration("1month"),
            Some(SignedDuration::from_hours(30 * 24))
        );
        assert_eq!(
            parse_human_duration("1d 12h"),
            Some(SignedDuration::from_hours(36))
        );
        assert_eq!(parse_human_duration("soon"), None);
        assert_eq!(parse_human_duration(""), None);
    }

    fn tag(name: &str, days_old: i64) -> SeedTag {
        SeedTag {
            name: name.into(),
            digest: Some(format!("sha256:{}", pseudo_hex(name, 64))),
            created_at: Some(
                ts("2025-01-01T00:00:00Z") - SignedDuration::from_hours(24 * days_old),
            ),
            total_size: 100,
        }
    }

    fn state_with_tags(tags: Vec<SeedTag>) -> State {
        let mut state = state_with_groups();
        state
            .apply_seed(&Seed {
                projects: vec![SeedProject {
                    id: 5,
                    path_with_namespace: "org/app".into(),
                    repositories: vec![SeedRepository {
                        id: Some(7),
                        name: String::new(),
                        created_at: None,
                        tags,
                    }],
                    tag_protection_rules: vec![crate::sim::seed::SeedProtectionRule {
                        tag_name_pattern: "^protected".into(),
                        minimum_access_level_for_push: AccessLevel::Maintainer,
                        minimum_access_level_for_delete: AccessLevel::Owner,
                    }],
                    branches: Vec::new(),
                }],
                ..Seed::default()
            })
            .unwrap();
        state
    }

    #[test]
    fn bulk_delete_follows_gitlab_filter_order() {
        let mut state = state_with_tags(vec![
            tag("latest", 100),
            tag("v1", 50),
            tag("v2", 40),
            tag("v3", 30),
            tag("v4", 1),
            tag("stable-1", 60),
            tag("protected-1", 90),
            SeedTag {
                digest: None,
                created_at: None,
                ..tag("nomanifest", 0)
            },
        ]);
        let request =
            BulkDelete::new(Some(".*"), None, Some("stable-.*"), Some(1), Some("7d")).unwrap();
        let mut deleted = state
            .bulk_delete_tags(5, 7, &request, AccessLevel::Maintainer)
            .unwrap();
        deleted.sort();
        // nomanifest has no time, so it counts as now: the newest, kept by keep_n; v4 is
        // younger than older_than; latest, stable-1 and protected-1 survive.
        assert_eq!(deleted, vec!["v1", "v2", "v3"]);
        let again = state
            .bulk_delete_tags(5, 7, &request, AccessLevel::Maintainer)
            .unwrap_err();
        assert_eq!(
            again.body,
            json!({"message": "This request has already been made. You can run this at most once an hour for a given container repository"})
        );
        state.advance_clock(SignedDuration::from_mins(61)).unwrap();
        assert!(
            state
                .bulk_delete_tags(5, 7, &request, AccessLevel::Maintainer)
                .is_ok()
        );
    }

    #[test]
    fn bulk_delete_parameter_errors() {
        let missing = BulkDelete::new(None, None, None, None, None).unwrap_err();
        assert_eq!(
            missing.body,
            json!({"error": "name_regex, name_regex_delete are missing, at least one parameter must be provided"})
        );
        let invalid = BulkDelete::new(Some("(abc"), None, None, None, None).unwrap_err();
        let message = invalid.body["error"].as_str().unwrap();
        assert!(
            message.starts_with("name_regex_delete is an invalid regexp: "),
            "{message}"
        );
        assert!(BulkDelete::new(None, Some(".*"), None, None, None).is_ok());
        // `older_than` is the worker's to parse: accepted here.
        assert!(BulkDelete::new(Some(".*"), None, None, None, Some("whenever")).is_ok());
    }

    #[test]
    fn protected_tags_are_refused() {
        let mut state = state_with_tags(vec![tag("protected-1", 1), tag("free", 1)]);
        let error = state
            .delete_tag(5, 7, "protected-1", AccessLevel::Maintainer)
            .unwrap_err();
        assert_eq!(error, ApiError::forbidden());
        assert_eq!(
            state
                .delete_tag(5, 7, "free", AccessLevel::Reporter)
                .unwrap_err(),
            ApiError::forbidden()
        );
        state
            .delete_tag(5, 7, "free", AccessLevel::Developer)
            .unwrap();
        state
            .delete_tag(5, 7, "protected-1", AccessLevel::Owner)
            .unwrap();
        assert_eq!(
            state.tag(5, 7, "gone").unwrap_err().body,
            json!({"message": "404 Tag Not Found"})
        );
    }

    #[test]
    fn expiration_policy_validation_and_next_run() {
        let mut state = state_with_tags(Vec::new());
        let attributes = json!({"cadence": "7d", "enabled": true, "keep_n": 5, "older_than": "14d", "name_regex": ".*"});
        let project = state
            .update_project(5, None, attributes.as_object())
            .unwrap();
        let policy = &project.container_expiration_policy;
        assert_eq!(policy.cadence, "7d");
        assert_eq!(policy.next_run_at, Some(ts("2025-01-08T00:00:00Z")));
        let bad = json!({"cadence": "2d"});
        let error = state.update_project(5, None, bad.as_object()).unwrap_err();
        assert_eq!(
            error.body,
            json!({"message": {"container_expiration_policy.cadence": ["is not included in the list"]}})
        );
        let bad = json!({"keep_n": 3});
        assert_eq!(
            state
                .update_project(5, None, bad.as_object())
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn cache_entries_are_listed_newest_first_searched_and_deleted_by_id() {
        let mut state = state_with_groups();
        let registry = state.create_registry(10, "r", None).unwrap();
        let (created, _) = state
            .create_upstream(registry.id, upstream("u", "https://u.example.com"), false)
            .unwrap();
        let now = state.now();
        for path in [
            "library/nginx/manifests/latest",
            "library/alpine/manifests/3",
            "Library/Nginx/blobs/sha256:abc",
        ] {
            state
                .put_cache_entry(CacheEntry::cached_at(10, created.id, path, now))
                .unwrap();
        }
        let all: Vec<u64> = state
            .cache_entries_of_upstream(created.id, None)
            .unwrap()
            .iter()
            .map(|entry| entry.iid)
            .collect();
        assert_eq!(all, vec![3, 2, 1]);
        let found = state
            .cache_entries_of_upstream(created.id, Some("NGINX"))
            .unwrap();
        assert_eq!(found.len(), 2);
        let id = found[1].id();
        assert_eq!(
            String::from_utf8(URL_SAFE.decode(&id).unwrap()).unwrap(),
            "10 1"
        );
        state.delete_cache_entry(&id).unwrap();
        assert_eq!(state.delete_cache_entry(&id).unwrap_err().status, 404);
        for malformed in ["%%%", &URL_SAFE.encode("10 x"), &URL_SAFE.encode("ten")] {
            assert_eq!(
                state.delete_cache_entry(malformed).unwrap_err(),
                ApiError::parameter("id is invalid")
            );
        }
        state.purge_upstream_cache(created.id).unwrap();
        assert!(
            state
                .cache_entries_of_upstream(created.id, None)
                .unwrap()
                .is_empty()
        );
    }
}
