//! Reading manifests from files and directories (multi-document YAML), validating each the
//! way the apiserver validates it against our CRDs (OpenAPI schema and CEL rules, same
//! messages), and checking the references between them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use kube::{CustomResourceExt, ResourceExt};
use serde_json::Value;

use crate::crd::{CleanupPolicy, Upstream, VirtualRegistry, validation};

/// One object read from disk.
#[derive(Clone, Debug)]
pub struct Manifest<T> {
    /// `path` or `path#N` for the N-th document of a multi-document file.
    pub source: String,
    pub object: T,
}

/// Everything read from the given paths, by kind.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub secrets: Vec<Manifest<Secret>>,
    pub upstreams: Vec<Manifest<Upstream>>,
    pub registries: Vec<Manifest<VirtualRegistry>>,
    pub cleanup_policies: Vec<Manifest<CleanupPolicy>>,
    /// Documents of other kinds, passed over.
    pub skipped: Vec<String>,
}

/// A problem with one manifest: where, which field, what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {kind} {name}: {field}: {message}")]
pub struct ManifestError {
    /// File (and document number) the manifest came from.
    pub origin: String,
    pub kind: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

/// Every problem found; reading goes on after the first so the user sees them all at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ManifestErrors(pub Vec<ManifestError>);

/// Reads every `.yaml`/`.yml`/`.json` file under `paths` (directories recursively, in name
/// order) and validates what it finds.
pub fn load(paths: &[PathBuf]) -> Result<Manifests, ManifestErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        collect_files(path, &mut files, &mut errors);
    }
    let mut manifests = Manifests::default();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(error) => {
                errors.push(file_error(&file, format!("cannot read: {error}")));
                continue;
            }
        };
        let documents: Vec<Value> = match serde_saphyr::from_multiple(&text) {
            Ok(documents) => documents,
            Err(error) => {
                errors.push(file_error(&file, format!("not valid YAML: {error}")));
                continue;
            }
        };
        let documents: Vec<Value> = documents.into_iter().filter(|d| !d.is_null()).collect();
        let several = documents.len() > 1;
        for (index, document) in documents.into_iter().enumerate() {
            let source = if several {
                format!("{}#{}", file.display(), index + 1)
            } else {
                file.display().to_string()
            };
            add_document(&mut manifests, source, document, &mut errors);
        }
    }
    check_semantics(&manifests, &mut errors);
    check_references(&manifests, &mut errors);
    check_duplicates(&manifests, &mut errors);
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(ManifestErrors(errors))
    }
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<ManifestError>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(error) => {
                errors.push(file_error(path, format!("cannot read directory: {error}")));
                return;
            }
        };
        entries.sort();
        for entry in entries {
            if entry.is_dir()
                || entry
                    .extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            {
                collect_files(&entry, files, errors);
            }
        }
    } else if path.exists() {
        files.push(path.to_path_buf());
    } else {
        errors.push(file_error(path, "no such file or directory".into()));
    }
}

fn file_error(path: &Path, message: String) -> ManifestError {
    ManifestError {
        origin: path.display().to_string(),
        kind: "file".into(),
        name: String::new(),
        field: "-".into(),
        message,
    }
}

fn add_document(
    manifests: &mut Manifests,
    source: String,
    document: Value,
    errors: &mut Vec<ManifestError>,
) {
    let kind = document["kind"].as_str().unwrap_or_default().to_string();
    let name = document["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api_version = document["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let error = |field: &str, message: String| ManifestError {
        origin: source.clone(),
        kind: if kind.is_empty() {
            "(no kind)".into()
        } else {
            kind.clone()
        },
        name: if name.is_empty() {
            "(no name)".into()
        } else {
            name.clone()
        },
        field: field.into(),
        message,
    };
    if name.is_empty() && !kind.is_empty() {
        errors.push(error("metadata.name", "is required".into()));
        return;
    }
    let ours = api_version.starts_with(&format!("{}/", crate::crd::GROUP));
    if ours && api_version != format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION) {
        errors.push(error(
            "apiVersion",
            format!(
                "{api_version} is not served; use {}/{}",
                crate::crd::GROUP,
                crate::crd::VERSION
            ),
        ));
        return;
    }
    match (ours, kind.as_str()) {
        (false, "Secret") if api_version == "v1" => {
            match serde_json::from_value::<Secret>(document) {
                Ok(secret) => manifests.secrets.push(Manifest {
                    source,
                    object: secret,
                }),
                Err(e) => errors.push(error("-", e.to_string())),
            }
        }
        (true, "Upstream") => {
            if let Some(object) = validated::<Upstream>(&document, &error, errors) {
                manifests.upstreams.push(Manifest { source, object });
            }
        }
        (true, "VirtualRegistry") => {
            if let Some(object) = validated::<VirtualRegistry>(&document, &error, errors) {
                manifests.registries.push(Manifest { source, object });
            }
        }
        (true, "CleanupPolicy") => {
            if let Some(object) = validated::<CleanupPolicy>(&document, &error, errors) {
                manifests.cleanup_policies.push(Manifest { source, object });
            }
        }
        (true, other) => errors.push(error(
            "kind",
            format!("{other:?} is not a kind of {}", crate::crd::GROUP),
        )),
        (false, _) => manifests.skipped.push(format!("{source}: {kind} {name}")),
    }
}

/// Validates against the CRD's schema and CEL rules, then reads the document into its type.
fn validated<T>(
    document: &Value,
    error: &dyn Fn(&str, String) -> ManifestError,
    errors: &mut Vec<ManifestError>,
) -> Option<T>
where
    T: CustomResourceExt + serde::de::DeserializeOwned,
{
    let definition = T::crd();
    let schema = validation::open_api_schema(&definition);
    let before = errors.len();
    match jsonschema::validator_for(&schema) {
        Ok(validator) => {
            for failure in validator.iter_errors(document) {
                let field = failure
                    .instance_path
                    .to_string()
                    .trim_start_matches('/')
                    .replace('/', ".");
                errors.push(error(
                    if field.is_empty() { "-" } else { &field },
                    failure.to_string(),
                ));
            }
        }
        Err(failure) => errors.push(error("-", format!("schema does not compile: {failure}"))),
    }
    if errors.len() == before {
        for failure in validation::cel_failures(&definition, document) {
            errors.push(error(&failure.field, failure.message));
        }
    }
    if errors.len() > before {
        return None;
    }
    match serde_json::from_value::<T>(document.clone()) {
        Ok(object) => Some(object),
        Err(failure) => {
            errors.push(error("-", failure.to_string()));
            None
        }
    }
}

fn namespace_of<K: ResourceExt>(object: &K) -> String {
    object.namespace().unwrap_or_else(|| "default".into())
}

fn check_references(manifests: &Manifests, errors: &mut Vec<ManifestError>) {
    let upstream_exists = |namespace: &str, name: &str| {
        manifests
            .upstreams
            .iter()
            .any(|u| namespace_of(&u.object) == namespace && u.object.name_any() == name)
    };
    let secret_exists = |namespace: &str, name: &str| {
        manifests
            .secrets
            .iter()
            .any(|s| namespace_of(&s.object) == namespace && s.object.name_any() == name)
    };
    for registry in &manifests.registries {
        let namespace = namespace_of(&registry.object);
        for (index, reference) in registry.object.spec.upstreams.iter().enumerate() {
            if !upstream_exists(&namespace, &reference.name) {
                errors.push(ManifestError {
                    origin: registry.source.clone(),
                    kind: "VirtualRegistry".into(),
                    name: registry.object.name_any(),
                    field: format!("spec.upstreams[{index}].name"),
                    message: format!(
                        "no Upstream named {:?} in namespace {namespace} among the manifests",
                        reference.name
                    ),
                });
            }
        }
    }
    for upstream in &manifests.upstreams {
        let namespace = namespace_of(&upstream.object);
        if let Some(reference) = &upstream.object.spec.credentials_secret_ref
            && !secret_exists(&namespace, &reference.name)
            && !secret_in_environment(&reference.name, &reference.password_key)
        {
            errors.push(ManifestError {
                origin: upstream.source.clone(),
                kind: "Upstream".into(),
                name: upstream.object.name_any(),
                field: "spec.credentialsSecretRef.name".into(),
                message: format!(
                    "no Secret named {:?} in namespace {namespace} among the manifests, and no {} in the environment",
                    reference.name,
                    environment_variable(&reference.name, &reference.password_key)
                ),
            });
        }
    }
    for policy in &manifests.cleanup_policies {
        let namespace = namespace_of(&policy.object);
        if let Some(cache) = &policy.object.spec.target.upstream_cache
            && !upstream_exists(&namespace, &cache.upstream_ref.name)
        {
            errors.push(ManifestError {
                origin: policy.source.clone(),
                kind: "CleanupPolicy".into(),
                name: policy.object.name_any(),
                field: "spec.target.upstreamCache.upstreamRef.name".into(),
                message: format!(
                    "no Upstream named {:?} in namespace {namespace} among the manifests",
                    cache.upstream_ref.name
                ),
            });
        }
    }
}

/// What the CRD schema cannot check but the engines would refuse: regexes, durations, cron
/// expressions and time zones, with the same messages the controllers put in conditions.
fn check_semantics(manifests: &Manifests, errors: &mut Vec<ManifestError>) {
    use crate::cleanup::{CompiledRules, Schedule, parse_duration};
    let mut push = |origin: &str, kind: &str, name: String, field: &str, message: String| {
        errors.push(ManifestError {
            origin: origin.into(),
            kind: kind.into(),
            name,
            field: field.into(),
            message,
        })
    };
    for upstream in &manifests.upstreams {
        if let Err(error) = parse_duration(&upstream.object.spec.connectivity_check.interval) {
            push(
                &upstream.source,
                "Upstream",
                upstream.object.name_any(),
                "spec.connectivityCheck.interval",
                error.to_string(),
            );
        }
    }
    for policy in &manifests.cleanup_policies {
        let spec = &policy.object.spec;
        let name = policy.object.name_any();
        let mut refuse = |field: &str, message: String| {
            push(
                &policy.source,
                "CleanupPolicy",
                name.clone(),
                field,
                message,
            )
        };
        if spec.rules.is_some() {
            // The engine's own reading of the spec, so that both refuse the same input.
            match crate::sync::cleanup::rule_spec(spec) {
                Ok(rule_spec) => {
                    if let Err(error) = CompiledRules::compile(&rule_spec) {
                        let field = match error.field() {
                            Some(field) if field.starts_with("safety.") => format!("spec.{field}"),
                            _ => "spec.rules".to_owned(),
                        };
                        refuse(&field, error.to_string());
                    }
                }
                Err(error) => refuse("spec.rules", error.message()),
            }
        }
        if let Some(path_regex) = spec
            .target
            .container_repositories
            .as_ref()
            .and_then(|t| t.path_regex.as_deref())
            && let Err(error) = regex::Regex::new(&format!(r"\A(?:{path_regex})\z"))
        {
            refuse(
                "spec.target.containerRepositories.pathRegex",
                error.to_string(),
            );
        }
        if let Some(cache_rules) = &spec.cache_rules
            && let Err(error) = parse_duration(&cache_rules.not_downloaded_for)
        {
            refuse("spec.cacheRules.notDownloadedFor", error.to_string());
        }
        if let Err(error) = Schedule::parse(&spec.schedule, &spec.time_zone) {
            refuse("spec.schedule", error.to_string());
        }
    }
}

fn check_duplicates(manifests: &Manifests, errors: &mut Vec<ManifestError>) {
    fn check<K: ResourceExt>(kind: &str, items: &[Manifest<K>], errors: &mut Vec<ManifestError>) {
        let mut seen: BTreeMap<(String, String), &str> = BTreeMap::new();
        for item in items {
            let key = (namespace_of(&item.object), item.object.name_any());
            if let Some(first) = seen.insert(key.clone(), &item.source) {
                errors.push(ManifestError {
                    origin: item.source.clone(),
                    kind: kind.into(),
                    name: key.1,
                    field: "metadata.name".into(),
                    message: format!("declared twice (first in {first})"),
                });
            }
        }
    }
    check("Upstream", &manifests.upstreams, errors);
    check("VirtualRegistry", &manifests.registries, errors);
    check("CleanupPolicy", &manifests.cleanup_policies, errors);
    check("Secret", &manifests.secrets, errors);
}

/// The environment variable that can stand in for a Secret key in standalone mode:
/// `<SECRET>_<KEY>`, upper-cased, other characters as `_` (`dockerhub-credentials` /
/// `password` → `DOCKERHUB_CREDENTIALS_PASSWORD`).
pub fn environment_variable(secret: &str, key: &str) -> String {
    format!("{secret}_{key}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn secret_in_environment(secret: &str, key: &str) -> bool {
    std::env::var_os(environment_variable(secret, key)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("writable");
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gro-manifests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn examples_load_cleanly() {
        let manifests = load(&[PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")])
            .expect("examples are valid");
        assert_eq!(manifests.upstreams.len(), 2);
        assert_eq!(manifests.registries.len(), 1);
        assert_eq!(manifests.cleanup_policies.len(), 5);
        assert_eq!(manifests.secrets.len(), 1);
    }

    #[test]
    fn each_invalid_manifest_gives_one_error_naming_file_and_field() {
        let dir = temp_dir("invalid");
        write(
            &dir,
            "regex.yaml",
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {name: two-targets}\nspec:\n  target:\n    containerRepositories: {project: a/b}\n    upstreamCache: {upstreamRef: {name: dockerhub}}\n  rules: {nameRegexDelete: '.*'}\n  cacheRules: {notDownloadedFor: 30d}\n",
        );
        write(
            &dir,
            "registry.yaml",
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {name: cache}\nspec: {group: my-org, upstreams: [{name: nowhere}]}\n",
        );
        write(
            &dir,
            "bad-regex.yaml",
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {name: bad}\nspec:\n  target: {containerRepositories: {project: a/b}}\n  rules: {nameRegexDelete: 'v(1'}\n",
        );
        write(
            &dir,
            "upstream.yaml",
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: dockerhub}\nspec: {group: my-org, url: 'https://registry-1.docker.io', credentialsSecretRef: {name: missing-secret}}\n",
        );
        let errors = load(std::slice::from_ref(&dir)).expect_err("invalid").0;
        assert_eq!(errors.len(), 4, "{errors:#?}");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|e| e.contains("regex.yaml")
                && e.contains("exactly one of containerRepositories or upstreamCache")),
            "{text:#?}"
        );
        assert!(text.iter().any(|e| e.contains("registry.yaml")
            && e.contains("spec.upstreams[0].name")
            && e.contains("nowhere")));
        assert!(
            text.iter().any(|e| e.contains("bad-regex.yaml")
                && e.contains("nameRegexDelete")
                && e.contains("v(1")),
            "{text:#?}"
        );
        assert!(text.iter().any(|e| e.contains("upstream.yaml")
            && e.contains("spec.credentialsSecretRef.name")
            && e.contains("MISSING_SECRET_PASSWORD")));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn schema_errors_name_the_field() {
        let dir = temp_dir("schema");
        write(
            &dir,
            "many.yaml",
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: u}\nspec: {group: g, url: 'https://quay.io', cacheValidityHours: -1}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\n",
        );
        let errors = load(std::slice::from_ref(&dir)).expect_err("invalid").0;
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].field, "spec.cacheValidityHours");
        assert!(errors[0].origin.ends_with("many.yaml#1"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn environment_variable_names_are_shell_safe() {
        assert_eq!(
            environment_variable("dockerhub-credentials", "password"),
            "DOCKERHUB_CREDENTIALS_PASSWORD"
        );
    }
}
