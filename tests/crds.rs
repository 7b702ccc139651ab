//! The generated CRDs: kept in `crds/`, structural as the apiserver requires, and every
//! example in `examples/` valid against them (OpenAPI schema and CEL rules) and parseable
//! into its Rust type.

use std::path::{Path, PathBuf};

use gitlab_registry_operator::crd::{self, CleanupPolicy, Upstream, VirtualRegistry, validation};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn crds_directory_holds_exactly_the_generated_crds() {
    for (file, definition) in crd::all() {
        let expected = crd::to_yaml(&definition).expect("CRD renders as YAML");
        let path = repo_path("crds").join(file);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == expected,
            "{} is stale or missing: regenerate it with `cargo run -- crds --output-dir crds`",
            path.display()
        );
    }
    let files: Vec<_> = std::fs::read_dir(repo_path("crds"))
        .expect("crds/ exists")
        .map(|entry| {
            entry
                .expect("readable entry")
                .file_name()
                .into_string()
                .expect("utf-8 name")
        })
        .collect();
    assert_eq!(
        files.len(),
        crd::all().len(),
        "crds/ holds one file per kind and nothing else: {files:?}"
    );
}

#[test]
fn crds_command_output_is_the_concatenation_of_the_files() {
    let printed = crd::all_yaml().expect("renders");
    let mut from_files = String::new();
    for (file, _) in crd::all() {
        from_files.push_str("---\n");
        from_files
            .push_str(&std::fs::read_to_string(repo_path("crds").join(file)).unwrap_or_default());
    }
    assert_eq!(printed, from_files);
}

#[test]
fn checked_in_crds_parse_as_custom_resource_definitions() {
    for (file, definition) in crd::all() {
        let text = std::fs::read_to_string(repo_path("crds").join(file)).expect("file exists");
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(&text).expect("parses as a CRD");
        assert_eq!(parsed.metadata.name, definition.metadata.name);
        assert_eq!(parsed.spec.group, crd::GROUP);
        assert_eq!(parsed.spec.versions.len(), 1);
        assert_eq!(parsed.spec.versions[0].name, crd::VERSION);
        assert!(
            parsed.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
    }
}

/// Walks a schema node and records every place that breaks the apiserver's structural rules.
fn structural_violations(node: &Value, path: &str, violations: &mut Vec<String>) {
    let Some(object) = node.as_object() else {
        violations.push(format!("{path}: not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "definitions",
        "$defs",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
    ] {
        if object.contains_key(forbidden) {
            violations.push(format!("{path}: has {forbidden}"));
        }
    }
    let typed = object.contains_key("type")
        || object.get("x-kubernetes-int-or-string") == Some(&json!(true))
        || object.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if !typed {
        violations.push(format!("{path}: no type"));
    }
    if object.contains_key("nullable") && !object.contains_key("type") {
        violations.push(format!("{path}: nullable without type"));
    }
    if let Some(properties) = object.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            structural_violations(child, &format!("{path}.{name}"), violations);
        }
    }
    if let Some(items) = object.get("items") {
        structural_violations(items, &format!("{path}[]"), violations);
        if object.get("x-kubernetes-list-type") == Some(&json!("map")) {
            let keys = object
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let required = items
                .get("required")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if keys.is_empty() {
                violations.push(format!("{path}: list-type map without keys"));
            }
            for key in keys {
                if !required.contains(&key) {
                    violations.push(format!("{path}: map key {key} is not required in items"));
                }
            }
        }
    }
    if let Some(additional) = object
        .get("additionalProperties")
        .filter(|value| value.is_object())
    {
        structural_violations(additional, &format!("{path}{{}}"), violations);
    }
}

#[test]
fn every_schema_node_is_structural() {
    for (file, definition) in crd::all() {
        let schema = validation::open_api_schema(&definition);
        assert!(schema.is_object(), "{file} has an openAPIV3Schema");
        let mut violations = Vec::new();
        structural_violations(&schema, file, &mut violations);
        assert!(
            violations.is_empty(),
            "non-structural schema nodes: {violations:#?}"
        );
    }
}

#[test]
fn conditions_are_a_map_keyed_by_type_with_printer_columns_and_short_names() {
    for (file, definition) in crd::all() {
        let schema = validation::open_api_schema(&definition);
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], json!("map"), "{file}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            json!(["type"]),
            "{file}"
        );
        let status = &schema["properties"]["status"]["properties"];
        assert!(
            status.get("observedGeneration").is_some(),
            "{file} has observedGeneration"
        );
        let version = &definition.spec.versions[0];
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            columns.contains(&"Ready") && columns.contains(&"Age"),
            "{file}: {columns:?}"
        );
        assert!(
            definition
                .spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|names| !names.is_empty()),
            "{file}"
        );
    }
    let upstream_columns: Vec<_> = Upstream::crd().spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(
        upstream_columns.contains(&"URL".to_string())
            && upstream_columns.contains(&"Reachable".to_string())
    );
    let cleanup_columns: Vec<_> = CleanupPolicy::crd().spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    for column in ["Schedule", "Last run", "Deleted", "Next run"] {
        assert!(
            cleanup_columns.contains(&column.to_string()),
            "CleanupPolicy has column {column}"
        );
    }
}

fn example_documents() -> Vec<(String, Value)> {
    let mut documents = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo_path("examples"))
        .expect("examples/ exists")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable");
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for value in values.into_iter().filter(|v| !v.is_null()) {
            documents.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                value,
            ));
        }
    }
    documents
}

fn crd_for(kind: &str) -> Option<CustomResourceDefinition> {
    match kind {
        "VirtualRegistry" => Some(VirtualRegistry::crd()),
        "Upstream" => Some(Upstream::crd()),
        "CleanupPolicy" => Some(CleanupPolicy::crd()),
        _ => None,
    }
}

/// Errors the apiserver would report for `object`: OpenAPI schema and CEL rules.
fn apiserver_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let definition = crd_for(kind).unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    let schema = validation::open_api_schema(&definition);
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    errors.extend(validation::cel_errors(&definition, object));
    errors
}

#[test]
fn every_example_parses_into_its_type_and_passes_schema_and_cel() {
    let documents = example_documents();
    let mut kinds = std::collections::BTreeMap::new();
    for (file, document) in &documents {
        let kind = document["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no kind"))
            .to_string();
        *kinds.entry(kind.clone()).or_insert(0) += 1;
        match kind.as_str() {
            "Secret" => {
                serde_json::from_value::<Secret>(document.clone())
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                continue;
            }
            "Upstream" => drop(
                serde_json::from_value::<Upstream>(document.clone())
                    .unwrap_or_else(|e| panic!("{file}: {e}")),
            ),
            "VirtualRegistry" => drop(
                serde_json::from_value::<VirtualRegistry>(document.clone())
                    .unwrap_or_else(|e| panic!("{file}: {e}")),
            ),
            "CleanupPolicy" => drop(
                serde_json::from_value::<CleanupPolicy>(document.clone())
                    .unwrap_or_else(|e| panic!("{file}: {e}")),
            ),
            other => panic!("{file}: unexpected kind {other}"),
        }
        let errors = apiserver_errors(document);
        assert!(errors.is_empty(), "{file}: {errors:#?}");
    }
    assert_eq!(kinds.get("Secret"), Some(&1));
    assert_eq!(kinds.get("Upstream"), Some(&2));
    assert_eq!(kinds.get("VirtualRegistry"), Some(&1));
    assert_eq!(kinds.get("CleanupPolicy"), Some(&5));
}

fn cleanup_policy(spec: Value) -> Value {
    json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "CleanupPolicy", "metadata": {"name": "p"}, "spec": spec})
}

fn assert_refused(object: Value, expected_fragment: &str) {
    let errors = apiserver_errors(&object);
    assert!(
        errors.iter().any(|e| e.contains(expected_fragment)),
        "expected an error containing {expected_fragment:?}, got {errors:#?}"
    );
}

#[test]
fn cel_refuses_two_cleanup_targets_and_none() {
    let rules = json!({"nameRegexDelete": ".*"});
    assert_refused(
        cleanup_policy(
            json!({"target": {"containerRepositories": {"project": "a/b"}, "upstreamCache": {"upstreamRef": {"name": "x"}}}, "rules": rules, "cacheRules": {"notDownloadedFor": "30d"}}),
        ),
        "exactly one of containerRepositories or upstreamCache",
    );
    assert_refused(
        cleanup_policy(json!({"target": {}})),
        "exactly one of containerRepositories or upstreamCache",
    );
    assert_refused(
        cleanup_policy(
            json!({"target": {"containerRepositories": {"project": "a/b", "group": "a"}}, "rules": rules}),
        ),
        "exactly one of project or group",
    );
}

#[test]
fn cel_refuses_missing_rules_and_gitlab_policy_values() {
    assert_refused(
        cleanup_policy(json!({"target": {"containerRepositories": {"project": "a/b"}}})),
        "needs rules.nameRegexDelete",
    );
    assert_refused(
        cleanup_policy(json!({"target": {"upstreamCache": {"upstreamRef": {"name": "x"}}}})),
        "needs cacheRules",
    );
    let gitlab_policy = |rules: Value| {
        cleanup_policy(
            json!({"strategy": "GitLabPolicy", "cadence": "7d", "target": {"containerRepositories": {"project": "a/b"}}, "rules": rules}),
        )
    };
    assert_refused(
        gitlab_policy(json!({"nameRegexDelete": ".*", "keepN": 7})),
        "keepN must be one of",
    );
    assert_refused(
        gitlab_policy(json!({"nameRegexDelete": ".*", "olderThan": "3d"})),
        "olderThan must be one of",
    );
    assert!(
        apiserver_errors(&gitlab_policy(
            json!({"nameRegexDelete": ".*", "keepN": 10, "olderThan": "30d"})
        ))
        .is_empty()
    );
    assert_refused(
        cleanup_policy(
            json!({"strategy": "GitLabPolicy", "cadence": "7d", "target": {"containerRepositories": {"group": "a"}}, "rules": {"nameRegexDelete": ".*"}}),
        ),
        "needs a containerRepositories target with a project",
    );
    assert_refused(
        cleanup_policy(
            json!({"strategy": "GitLabPolicy", "target": {"containerRepositories": {"project": "a/b"}}, "rules": {"nameRegexDelete": ".*"}}),
        ),
        "needs a cadence",
    );
    assert_refused(
        cleanup_policy(
            json!({"strategy": "GitLabPolicy", "cadence": "2d", "target": {"containerRepositories": {"project": "a/b"}}, "rules": {"nameRegexDelete": ".*"}}),
        ),
        "cadence",
    );
}

#[test]
fn cel_refuses_non_positive_durations() {
    let with_older_than = |older_than: &str| {
        cleanup_policy(
            json!({"target": {"containerRepositories": {"project": "a/b"}}, "rules": {"nameRegexDelete": ".*", "olderThan": older_than}}),
        )
    };
    assert_refused(
        with_older_than("0d"),
        "olderThan must be a positive duration",
    );
    assert_refused(
        with_older_than("-1d"),
        "olderThan must be a positive duration",
    );
    assert!(apiserver_errors(&with_older_than("14d")).is_empty());
    assert!(apiserver_errors(&with_older_than("1month")).is_empty());
    assert_refused(
        cleanup_policy(
            json!({"target": {"upstreamCache": {"upstreamRef": {"name": "x"}}}, "cacheRules": {"notDownloadedFor": "0d"}}),
        ),
        "notDownloadedFor must be a positive duration",
    );
    let upstream = json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "Upstream", "metadata": {"name": "u"},
        "spec": {"group": "g", "url": "https://quay.io", "connectivityCheck": {"interval": "0m"}}});
    assert_refused(upstream, "interval must be a positive duration");
}

#[test]
fn upstream_lists_are_limited_to_five_unique_names_and_urls_to_http() {
    let registry = |names: &[&str]| {
        json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry", "metadata": {"name": "r"},
            "spec": {"group": "g", "upstreams": names.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}})
    };
    assert!(apiserver_errors(&registry(&["a", "b", "c", "d", "e"])).is_empty());
    assert_refused(registry(&["a", "b", "a"]), "upstream names must be unique");
    let six = apiserver_errors(&registry(&["a", "b", "c", "d", "e", "f"]));
    assert!(!six.is_empty(), "six upstreams are refused");
    let upstream = json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "Upstream", "metadata": {"name": "u"},
        "spec": {"group": "g", "url": "ftp://example.com"}});
    assert_refused(upstream, "url must start with http:// or https://");
}

#[test]
fn defaults_fill_an_minimal_upstream() {
    let upstream: Upstream = serde_json::from_value(json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "Upstream",
        "metadata": {"name": "docker"}, "spec": {"group": "g", "url": "https://registry-1.docker.io"}}))
    .expect("parses");
    assert_eq!(upstream.gitlab_name(), "docker");
    assert_eq!(upstream.spec.cache_validity_hours, 24);
    assert_eq!(upstream.spec.connectivity_check.interval, "10m");
    assert!(upstream.spec.connectivity_check.gate_changes);
    assert_eq!(upstream.spec.deletion_policy, crd::DeletionPolicy::Delete);
    let policy: CleanupPolicy = serde_json::from_value(cleanup_policy(json!({"target": {"containerRepositories": {"project": "a/b"}}, "rules": {"nameRegexDelete": ".*"}}))).expect("parses");
    assert_eq!(policy.spec.schedule, "0 3 * * *");
    assert_eq!(policy.spec.time_zone, "UTC");
    assert!(policy.spec.safety.keep_in_use && policy.spec.safety.keep_shared_digests);
    assert_eq!(policy.spec.limits.max_deletions_per_run, 1000);
    assert_eq!(policy.spec.strategy, crd::CleanupStrategy::Operator);
}

/// An instance of `schema` with every field filled: each `date-time` string is `time`, each
/// condition list holds the types the printer columns filter on.
fn filled_from_schema(schema: &Value, time: &str) -> Value {
    match schema["type"].as_str() {
        Some("object") => {
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            Value::Object(
                properties
                    .iter()
                    .map(|(name, child)| (name.clone(), filled_from_schema(child, time)))
                    .collect(),
            )
        }
        Some("array") if schema["x-kubernetes-list-map-keys"] == json!(["type"]) => {
            let condition = filled_from_schema(&schema["items"], time);
            Value::Array(
                ["Ready", "Synced", "Reachable"]
                    .into_iter()
                    .map(|type_| {
                        let mut condition = condition.clone();
                        condition["type"] = json!(type_);
                        condition["status"] = json!("True");
                        condition
                    })
                    .collect(),
            )
        }
        Some("array") => json!([filled_from_schema(&schema["items"], time)]),
        Some("string") if schema["format"] == "date-time" => json!(time),
        Some("string") => schema["enum"].get(0).cloned().unwrap_or(json!("text")),
        Some("integer") | Some("number") => json!(7),
        Some("boolean") => json!(true),
        _ => json!("text"),
    }
}

/// What kubectl shows in `column` of `object`: the values its jsonPath selects.
fn column_values<'a>(object: &'a Value, json_path: &str) -> Vec<&'a Value> {
    use jsonpath_rust::JsonPath;
    object
        .query(&format!("${json_path}"))
        .unwrap_or_else(|error| panic!("jsonPath {json_path}: {error}"))
}

#[test]
fn printer_columns_show_no_future_time_as_a_date() {
    let now = jiff::Timestamp::now();
    let past = (now - jiff::SignedDuration::from_hours(30 * 24)).to_string();
    let future = (now + jiff::SignedDuration::from_hours(30 * 24)).to_string();
    for (file, definition) in crd::all() {
        let schema = validation::open_api_schema(&definition);
        let columns = definition.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let mut future_strings = 0;
        // Every time of the object ahead, then every time behind; it was created in the past.
        for time in [&future, &past] {
            let mut object = filled_from_schema(&schema, time);
            object["metadata"] =
                json!({"name": "sample", "namespace": "team", "creationTimestamp": past});
            for column in &columns {
                let values = column_values(&object, &column.json_path);
                assert!(
                    !values.is_empty(),
                    "{file}: column {:?} ({}) shows nothing for a full object",
                    column.name,
                    column.json_path
                );
                for value in values {
                    let shown = value.as_str().unwrap_or_default();
                    let is_time = shown.parse::<jiff::Timestamp>().ok();
                    if column.type_ == "date" {
                        let at = is_time.unwrap_or_else(|| {
                            panic!("{file}: date column {:?} shows {value}", column.name)
                        });
                        assert!(
                            at <= now,
                            "{file}: column {:?} is a date and shows the future time {shown}: kubectl prints <invalid>; make it type string",
                            column.name
                        );
                    } else if time == &future && is_time.is_some_and(|at| at > now) {
                        future_strings += 1;
                    }
                }
            }
        }
        let age = columns
            .iter()
            .find(|c| c.name == "Age")
            .expect("Age column");
        assert_eq!(age.type_, "date", "{file}: Age stays a date");
        assert_eq!(age.json_path, ".metadata.creationTimestamp");
        if file.starts_with("cleanuppolicies") {
            assert_eq!(
                future_strings, 2,
                "{file}: Next run and Last run show a time ahead as RFC 3339"
            );
        }
    }
}

/// The YAML blocks of the README's "Retention recipes" section, each document apart.
fn retention_recipes() -> Vec<Value> {
    let readme = std::fs::read_to_string(repo_path("README.md")).expect("README.md");
    let section = readme
        .split("\n## Retention recipes\n")
        .nth(1)
        .expect("a Retention recipes section")
        .split("\n## ")
        .next()
        .expect("section text");
    let mut documents = Vec::new();
    for block in section.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().expect("closed block");
        let values: Vec<Value> =
            serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"));
        documents.extend(values.into_iter().filter(|v| !v.is_null()));
    }
    documents
}

#[test]
fn retention_recipes_pass_the_schema_cel_and_the_operators_own_checks() {
    use gitlab_registry_operator::cleanup::CompiledRules;
    use gitlab_registry_operator::sync::cleanup::{RunLimits, rule_spec};
    let recipes = retention_recipes();
    let names: Vec<&str> = recipes
        .iter()
        .map(|recipe| recipe["metadata"]["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        [
            "branch-builds",
            "release-families",
            "two-builds-per-branch",
            "at-most-half"
        ]
    );
    let mut rules_used = std::collections::BTreeSet::new();
    for recipe in &recipes {
        let errors = apiserver_errors(recipe);
        assert!(
            errors.is_empty(),
            "{}: {errors:#?}",
            recipe["metadata"]["name"]
        );
        let policy: CleanupPolicy = serde_json::from_value(recipe.clone()).expect("CleanupPolicy");
        let rules = rule_spec(&policy.spec).expect("rules");
        CompiledRules::compile(&rules).expect("rules compile");
        let limits = RunLimits::from_spec(&policy.spec.limits).expect("limits");
        if rules.keep_n_per_family.is_some() {
            rules_used.insert("keepNPerFamily");
        }
        if rules.keep_branch_tags.is_some() {
            rules_used.insert("keepBranchTags");
        }
        if limits.max_deletion_percent.is_some() {
            rules_used.insert("maxDeletionPercent");
        }
    }
    assert_eq!(rules_used.len(), 3, "{rules_used:?}");

    // examples/ holds the branch-builds recipe itself.
    let example: Value = example_documents()
        .into_iter()
        .find(|(file, _)| file == "cleanuppolicy-branch-builds.yaml")
        .map(|(_, document)| document)
        .expect("examples/cleanuppolicy-branch-builds.yaml");
    assert_eq!(example, recipes[0]);
}

#[test]
fn cel_and_schema_refuse_bad_families_budgets_and_gitlab_policy_use() {
    let operator = |rules: Value, safety: Value, limits: Value| {
        cleanup_policy(
            json!({"target": {"containerRepositories": {"project": "a/b"}},
            "rules": rules, "safety": safety, "limits": limits}),
        )
    };
    let family =
        |n: i64| json!({"nameRegexDelete": ".*", "keepNPerFamily": {"pattern": "(.+)", "n": n}});
    assert_refused(
        operator(family(0), json!({}), json!({})),
        "keepNPerFamily.n must be at least 1",
    );
    assert_refused(operator(family(-2), json!({}), json!({})), "minimum");
    assert!(apiserver_errors(&operator(family(1), json!({}), json!({}))).is_empty());
    let rules = json!({"nameRegexDelete": ".*"});
    for percent in [0, 101] {
        assert_refused(
            operator(
                rules.clone(),
                json!({}),
                json!({"maxDeletionPercent": percent}),
            ),
            "maxDeletionPercent",
        );
    }
    for percent in [1, 50, 100] {
        let object = operator(
            rules.clone(),
            json!({}),
            json!({"maxDeletionPercent": percent}),
        );
        assert!(apiserver_errors(&object).is_empty(), "{percent}");
    }
    assert_refused(
        operator(
            rules.clone(),
            json!({"keepBranchTags": {"pattern": ""}}),
            json!({}),
        ),
        "pattern",
    );
    let gitlab_policy = |rules: Value, safety: Value, limits: Value| {
        cleanup_policy(json!({"strategy": "GitLabPolicy", "cadence": "7d",
            "target": {"containerRepositories": {"project": "a/b"}},
            "rules": rules, "safety": safety, "limits": limits}))
    };
    let operator_only = "need strategy Operator";
    assert_refused(
        gitlab_policy(family(2), json!({}), json!({})),
        operator_only,
    );
    assert_refused(
        gitlab_policy(
            rules.clone(),
            json!({"keepBranchTags": {"pattern": "(.+)"}}),
            json!({}),
        ),
        operator_only,
    );
    assert_refused(
        gitlab_policy(rules.clone(), json!({}), json!({"maxDeletionPercent": 50})),
        operator_only,
    );
    assert!(apiserver_errors(&gitlab_policy(rules, json!({}), json!({}))).is_empty());
}
