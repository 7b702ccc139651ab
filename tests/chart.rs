//! The Helm chart in `charts/gitlab-registry-operator`: its CRDs are copies of `crds/`, its
//! README documents exactly the values in `values.yaml`, its schema covers and checks every
//! value, and (with a helm binary) what it renders: least-privilege RBAC without wildcards, a
//! hardened Deployment passing the flags `run` takes, the token from a Secret, the optional
//! ServiceMonitor and NetworkPolicy, and the optional PrometheusRule and Grafana dashboard,
//! whose queries may name only what the operator's metrics registry exports (the alerts are
//! also unit-tested with promtool when present). The Argo CD health script runs on sample
//! objects with lua5.4 when present, and the README shows it as it is.

#[path = "support/chart.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const RELEASE_NAMESPACE: &str = "gitlab-registry-system";
const RELEASE: &str = "gitlab-registry-operator";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn chart_path(relative: &str) -> PathBuf {
    repo_path("charts/gitlab-registry-operator").join(relative)
}

fn yaml_file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("readable entry")
                .file_name()
                .into_string()
                .expect("utf-8 name")
        })
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect()
}

#[test]
fn chart_crds_are_byte_identical_copies_of_the_repository_crds() {
    const FIX: &str = "fix with `cp crds/*.yaml charts/gitlab-registry-operator/crds/`";
    let repository = yaml_file_names(&repo_path("crds"));
    let chart = yaml_file_names(&chart_path("crds"));
    assert!(!repository.is_empty(), "crds/ holds the generated CRDs");
    assert_eq!(
        chart, repository,
        "charts/gitlab-registry-operator/crds/ must hold the same files as crds/: {FIX}"
    );
    for file in &repository {
        let original = std::fs::read(repo_path("crds").join(file)).expect("readable");
        let copy = std::fs::read(chart_path("crds").join(file)).expect("readable");
        assert!(
            original == copy,
            "charts/gitlab-registry-operator/crds/{file} differs from crds/{file}: {FIX}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// values.yaml, README.md and values.schema.json agree

fn values() -> Value {
    let text = std::fs::read_to_string(chart_path("values.yaml")).expect("values.yaml");
    serde_saphyr::from_str(&text).expect("values.yaml parses")
}

/// Leaf values by dotted path: scalars, lists and empty maps (a non-empty map is descended into).
fn leaves(value: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(child, &path, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned(), value.clone());
        }
    }
}

fn value_leaves() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    leaves(&values(), "", &mut out);
    out
}

/// The configuration table of README.md: key -> (default as JSON, description).
fn readme_table() -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(chart_path("README.md")).expect("README.md");
    let section = text
        .split_once("\n## Configuration\n")
        .map(|(_, rest)| rest)
        .expect("README.md has a `## Configuration` section");
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|line| line.starts_with("| `")) {
        // Split on " | " so that escaped pipes (`\|`) inside descriptions stay intact.
        let cells: Vec<&str> = line
            .trim_start_matches("| ")
            .trim_end_matches(" |")
            .split(" | ")
            .collect();
        assert_eq!(
            cells.len(),
            3,
            "table row has key, default, description: {line}"
        );
        let key = cells[0].trim_matches('`').to_owned();
        let default = cells[1].trim_matches('`').to_owned();
        let description = cells[2].trim().to_owned();
        assert!(
            rows.insert(key.clone(), (default, description)).is_none(),
            "README.md lists `{key}` twice"
        );
    }
    rows
}

#[test]
fn readme_configuration_table_lists_every_value_with_its_default() {
    let values = value_leaves();
    let table = readme_table();
    let in_values: BTreeSet<&String> = values.keys().collect();
    let in_table: BTreeSet<&String> = table.keys().collect();
    let undocumented: Vec<_> = in_values.difference(&in_table).collect();
    let unknown: Vec<_> = in_table.difference(&in_values).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "README.md's configuration table and values.yaml disagree: missing from the table \
         {undocumented:?}, not in values.yaml {unknown:?}"
    );
    for (key, value) in &values {
        let (default, description) = &table[key];
        let documented: Value = serde_json::from_str(default).unwrap_or_else(|e| {
            panic!("README.md default of `{key}` is not JSON ({e}): {default}")
        });
        assert_eq!(
            &documented, value,
            "README.md shows the wrong default for `{key}`"
        );
        assert!(
            !description.is_empty(),
            "`{key}` has no description in README.md"
        );
    }
}

/// Dotted paths of the keys in values.yaml that have a comment line directly above them.
fn commented_keys(text: &str) -> BTreeSet<String> {
    let mut commented = BTreeSet::new();
    let mut parents: Vec<(usize, String)> = Vec::new();
    let mut list_indent: Option<usize> = None;
    let mut previous_is_comment = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            previous_is_comment = trimmed.starts_with('#');
            continue;
        }
        let after_comment = std::mem::replace(&mut previous_is_comment, false);
        // List items (and the maps inside them) are values, not keys of the chart.
        if let Some(list) = list_indent {
            if indent > list || (indent == list && trimmed.starts_with('-')) {
                continue;
            }
            list_indent = None;
        }
        if trimmed.starts_with('-') {
            list_indent = Some(indent);
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        while parents.last().is_some_and(|(level, _)| *level >= indent) {
            parents.pop();
        }
        parents.push((indent, key.to_owned()));
        if after_comment {
            let path: Vec<&str> = parents.iter().map(|(_, key)| key.as_str()).collect();
            commented.insert(path.join("."));
        }
    }
    commented
}

#[test]
fn every_value_in_values_yaml_has_a_comment() {
    let text = std::fs::read_to_string(chart_path("values.yaml")).expect("values.yaml");
    let commented = commented_keys(&text);
    let uncommented: Vec<String> = value_leaves()
        .into_keys()
        .filter(|leaf| {
            // A group of related leaves (resources.requests.cpu, ...) may share one comment.
            let mut path = leaf.as_str();
            loop {
                if commented.contains(path) {
                    return false;
                }
                match path.rsplit_once('.') {
                    Some((parent, _)) => path = parent,
                    None => return true,
                }
            }
        })
        .collect();
    assert!(
        uncommented.is_empty(),
        "values.yaml: every value needs a `# --` comment above it: {uncommented:?}"
    );
}

fn schema() -> Value {
    let text = std::fs::read_to_string(chart_path("values.schema.json")).expect("schema");
    serde_json::from_str(&text).expect("values.schema.json is JSON")
}

#[test]
fn schema_describes_every_value_and_accepts_the_defaults() {
    let schema = schema();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    assert_eq!(schema["additionalProperties"], json!(false));
    for key in value_leaves().keys() {
        let mut node = &schema;
        for part in key.split('.') {
            let properties = &node["properties"];
            node = if properties.get(part).is_some() {
                &properties[part]
            } else {
                // Free-form maps (resources.requests, labels) describe their entries at once.
                assert!(
                    node["additionalProperties"].is_object(),
                    "values.schema.json does not describe `{key}`"
                );
                &node["additionalProperties"]
            };
        }
        assert!(
            node.get("type").is_some() || node.get("anyOf").is_some(),
            "values.schema.json gives `{key}` no type"
        );
    }
    let validator = jsonschema::draft7::new(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&values())
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "values.yaml fails its schema: {errors:?}"
    );
    for file in yaml_file_names(&chart_path("ci")) {
        let text = std::fs::read_to_string(chart_path("ci").join(&file)).expect("readable");
        let mut merged = values();
        merge(&mut merged, serde_saphyr::from_str(&text).expect("parses"));
        let errors: Vec<String> = validator
            .iter_errors(&merged)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        assert!(errors.is_empty(), "ci/{file} fails the schema: {errors:?}");
    }
}

/// Helm's value merge: maps merge key by key, everything else is replaced.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, overlay) => *base = overlay,
    }
}

#[test]
fn schema_refuses_unknown_keys_bad_enums_and_wrong_types() {
    let validator = jsonschema::draft7::new(&schema()).expect("schema compiles");
    let refused = [
        ("unknown top-level key", json!({"replicas": 2})),
        ("bad logFormat", json!({"logFormat": "xml"})),
        (
            "bad pull policy",
            json!({"image": {"pullPolicy": "Sometimes"}}),
        ),
        (
            "empty image repository",
            json!({"image": {"repository": ""}}),
        ),
        ("replica count as text", json!({"replicaCount": "2"})),
        ("resync without unit", json!({"resync": "600"})),
        (
            "unknown gitlab key",
            json!({"gitlab": {"tokenSecret": "x"}}),
        ),
        (
            "namespace with capitals",
            json!({"watchNamespace": "Team-A"}),
        ),
        ("port out of range", json!({"service": {"port": 70000}})),
        (
            "url without scheme",
            json!({"gitlab": {"url": "gitlab.example.com"}}),
        ),
    ];
    for (what, overlay) in refused {
        let mut candidate = values();
        merge(&mut candidate, overlay);
        assert!(
            !validator.is_valid(&candidate),
            "values.schema.json accepts a {what}"
        );
    }
    let mut image_without_tag = values();
    image_without_tag["image"]
        .as_object_mut()
        .expect("image is a map")
        .remove("tag");
    assert!(
        !validator.is_valid(&image_without_tag),
        "image.tag is required"
    );
}

// ---------------------------------------------------------------------------------------------
// Rendering with helm

/// The helm binary, or `None` (after saying why) when there is none, so the caller skips.
fn helm(test: &str) -> Option<PathBuf> {
    support::helm()
        .map_err(|reason| eprintln!("SKIPPED {test}: {reason}"))
        .ok()
}

/// Runs `helm <args>` on the chart; Ok(stdout) or Err(stderr).
fn run_helm(helm: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new(helm)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

fn chart_argument() -> String {
    chart_path("")
        .to_string_lossy()
        .trim_end_matches('/')
        .to_owned()
}

fn template(helm: &Path, extra: &[&str]) -> Result<String, String> {
    let chart = chart_argument();
    let mut args = vec![
        "template",
        RELEASE,
        &chart,
        "--namespace",
        RELEASE_NAMESPACE,
    ];
    args.extend_from_slice(extra);
    run_helm(helm, &args)
}

/// The objects `helm template` renders with these extra arguments (`--set ...`, `-f ...`).
fn render(helm: &Path, extra: &[&str]) -> Vec<Value> {
    let output =
        template(helm, extra).unwrap_or_else(|e| panic!("helm template {extra:?} fails: {e}"));
    let documents: Vec<Value> = serde_saphyr::from_multiple(&output)
        .unwrap_or_else(|e| panic!("helm template {extra:?} renders invalid YAML: {e}"));
    documents.into_iter().filter(|d| !d.is_null()).collect()
}

const NON_DEFAULT: &[&str] = &[
    "--set",
    "watchNamespace=team-a",
    "--set",
    "gitlab.url=https://gitlab.example.com",
    "--set",
    "gitlab.existingSecret=gitlab-token",
    "--set",
    "gitlab.existingSecretKey=api-token",
    "--set",
    "gitlab.caSecret=gitlab-ca",
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "replicaCount=2",
    "--set",
    "logFormat=text",
];

/// Default values, the non-default `--set`s above, and every `ci/*.yaml` values file.
fn renders(helm: &Path) -> Vec<(String, Vec<Value>)> {
    let mut renders = vec![
        ("default values".to_owned(), render(helm, &[])),
        (
            "non-default --set values".to_owned(),
            render(helm, NON_DEFAULT),
        ),
    ];
    for file in yaml_file_names(&chart_path("ci")) {
        let path = chart_path("ci").join(&file);
        let path = path.to_string_lossy();
        renders.push((format!("ci/{file}"), render(helm, &["-f", &path])));
    }
    renders
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one_of_kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, got {}",
        found.len()
    );
    found[0]
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// (apiGroup, resource) -> verbs, over the rules of the given Roles/ClusterRoles.
fn grants(roles: &[&Value]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut grants: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for role in roles {
        for rule in role["rules"].as_array().expect("rules") {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    grants
                        .entry((group.clone(), resource))
                        .or_default()
                        .extend(strings(&rule["verbs"]));
                }
            }
        }
    }
    grants
}

fn expected_operator_grants() -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut expected = BTreeMap::new();
    let mut grant = |group: &str, resource: &str, verbs: &[&str]| {
        expected.insert(
            (group.to_owned(), resource.to_owned()),
            verbs.iter().map(|verb| (*verb).to_owned()).collect(),
        );
    };
    // What `run` was seen to call (tests/process.rs derives it from the recorded requests).
    for kind in ["virtualregistries", "upstreams", "cleanuppolicies"] {
        grant("gitlabregistry.io", kind, &["list", "watch", "patch"]);
        grant("gitlabregistry.io", &format!("{kind}/status"), &["patch"]);
    }
    grant("", "secrets", &["get", "list", "watch"]);
    grant("", "pods", &["list", "watch"]);
    grant("events.k8s.io", "events", &["create", "patch"]);
    expected
}

fn is_leader_election_role(role: &Value) -> bool {
    role["metadata"]["name"]
        .as_str()
        .is_some_and(|name| name.ends_with("-leader-election"))
}

#[test]
fn rbac_has_no_wildcards_and_exactly_the_rights_the_operator_uses() {
    let Some(helm) = helm("rbac_has_no_wildcards_and_exactly_the_rights_the_operator_uses") else {
        return;
    };
    for (name, objects) in renders(&helm) {
        let roles: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
            .collect();
        assert!(!roles.is_empty(), "{name}: no Role or ClusterRole rendered");
        for role in &roles {
            for rule in role["rules"].as_array().expect("rules") {
                for field in [
                    "apiGroups",
                    "resources",
                    "verbs",
                    "resourceNames",
                    "nonResourceURLs",
                ] {
                    assert!(
                        !strings(&rule[field]).iter().any(|item| item.contains('*')),
                        "{name}: wildcard in {field} of {}: {rule}",
                        role["metadata"]["name"]
                    );
                }
            }
        }
        let operator_roles: Vec<&Value> = roles
            .iter()
            .copied()
            .filter(|role| !is_leader_election_role(role))
            .collect();
        let operator_grants = grants(&operator_roles);
        assert_eq!(
            operator_grants[&(String::new(), "secrets".to_owned())],
            ["get", "list", "watch"]
                .map(str::to_owned)
                .into_iter()
                .collect(),
            "{name}: Secrets are read-only"
        );
        assert_eq!(
            operator_grants,
            expected_operator_grants(),
            "{name}: operator rights"
        );
    }
}

fn deployment(objects: &[Value]) -> &Value {
    one_of_kind(objects, "Deployment")
}

fn container(objects: &[Value]) -> &Value {
    let containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

fn args(objects: &[Value]) -> Vec<String> {
    strings(&container(objects)["args"])
}

fn env<'a>(objects: &'a [Value], name: &str) -> Option<&'a Value> {
    container(objects)["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|variable| variable["name"] == name)
}

#[test]
fn default_install_is_cluster_wide_without_leader_election_or_extras() {
    let Some(helm) = helm("default_install_is_cluster_wide_without_leader_election_or_extras")
    else {
        return;
    };
    let objects = render(&helm, &[]);
    let cluster_role = one_of_kind(&objects, "ClusterRole");
    let binding = one_of_kind(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], cluster_role["metadata"]["name"]);
    let service_account = one_of_kind(&objects, "ServiceAccount");
    assert_eq!(
        binding["subjects"],
        json!([{
            "kind": "ServiceAccount",
            "name": service_account["metadata"]["name"],
            "namespace": RELEASE_NAMESPACE,
        }])
    );
    assert_eq!(
        deployment(&objects)["spec"]["template"]["spec"]["serviceAccountName"],
        service_account["metadata"]["name"]
    );
    assert!(
        of_kind(&objects, "Role").is_empty(),
        "no Lease Role without leader election"
    );
    for absent in ["Secret", "ServiceMonitor", "NetworkPolicy"] {
        assert!(
            of_kind(&objects, absent).is_empty(),
            "no {absent} by default"
        );
    }
    assert_eq!(
        args(&objects),
        [
            "run",
            "--resync=10m",
            "--metrics-addr=0.0.0.0:8080",
            "--log-format=json"
        ]
    );
    assert!(
        env(&objects, "GITLAB_TOKEN").is_none(),
        "no default connection, so no token"
    );
    assert_eq!(
        deployment(&objects)["spec"]["strategy"]["type"],
        "Recreate",
        "one reconciler at a time without leader election"
    );
}

#[test]
fn watch_namespace_grants_rights_in_that_namespace_only() {
    let Some(helm) = helm("watch_namespace_grants_rights_in_that_namespace_only") else {
        return;
    };
    let objects = render(&helm, NON_DEFAULT);
    assert!(
        of_kind(&objects, "ClusterRole").is_empty()
            && of_kind(&objects, "ClusterRoleBinding").is_empty(),
        "watchNamespace set: no cluster-wide rights"
    );
    let roles = of_kind(&objects, "Role");
    let operator_role = roles
        .iter()
        .find(|role| !is_leader_election_role(role))
        .expect("operator Role");
    assert_eq!(operator_role["metadata"]["namespace"], "team-a");
    let lease_role = roles
        .iter()
        .find(|role| is_leader_election_role(role))
        .expect("leader election Role with replicaCount=2");
    assert_eq!(lease_role["metadata"]["namespace"], RELEASE_NAMESPACE);
    assert_eq!(
        lease_role["rules"],
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
               {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "resourceNames": ["gitlab-registry-operator"], "verbs": ["get", "patch"]}])
    );
    let bindings = of_kind(&objects, "RoleBinding");
    assert_eq!(bindings.len(), 2, "one binding per Role");
    for role in &roles {
        let binding = bindings
            .iter()
            .find(|b| b["roleRef"]["name"] == role["metadata"]["name"])
            .expect("each Role is bound");
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(
            binding["metadata"]["namespace"],
            role["metadata"]["namespace"]
        );
        assert_eq!(binding["subjects"][0]["namespace"], RELEASE_NAMESPACE);
    }
    assert_eq!(
        args(&objects),
        [
            "run",
            "--gitlab-url=https://gitlab.example.com",
            "--gitlab-ca-file=/etc/gitlab-ca/ca.crt",
            "--resync=10m",
            "--metrics-addr=0.0.0.0:8080",
            "--leader-election",
            &format!("--leader-election-namespace={RELEASE_NAMESPACE}"),
            "--log-format=text",
            "--watch-namespace=team-a",
        ]
    );
    // --gitlab-ca-file names a file that the pod really has.
    let pod = &deployment(&objects)["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == "gitlab-ca")
        .expect("the CA volume");
    assert_eq!(
        volume["secret"],
        json!({"secretName": "gitlab-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]})
    );
    assert!(
        container(&objects)["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .any(|mount| mount["name"] == "gitlab-ca" && mount["mountPath"] == "/etc/gitlab-ca"),
        "the CA is mounted at /etc/gitlab-ca"
    );
}

#[test]
fn deployment_is_hardened_probed_and_serves_metrics_on_8080() {
    let Some(helm) = helm("deployment_is_hardened_probed_and_serves_metrics_on_8080") else {
        return;
    };
    for (name, objects) in renders(&helm) {
        let pod = &deployment(&objects)["spec"]["template"]["spec"];
        let pod_security = &pod["securityContext"];
        assert_eq!(pod_security["runAsNonRoot"], true, "{name}");
        assert_eq!(pod_security["runAsUser"], 65532, "{name}");
        assert_eq!(
            pod_security["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        let container = container(&objects);
        let security = &container["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{name}");
        assert_eq!(security["runAsUser"], 65532, "{name}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(
            security["capabilities"].get("add").is_none(),
            "{name}: no capability added"
        );
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );

        assert_eq!(
            container["ports"],
            json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]),
            "{name}"
        );
        assert!(
            args(&objects).contains(&"--metrics-addr=0.0.0.0:8080".to_owned()),
            "{name}: the binary listens where the port and probes point"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": "metrics"}),
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"],
            json!({"path": "/readyz", "port": "metrics"}),
            "{name}"
        );
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"][bound][resource].is_string(),
                    "{name}: resources.{bound}.{resource} is set"
                );
            }
        }
        for identity in ["POD_NAME", "POD_NAMESPACE"] {
            let variable = env(&objects, identity).expect("downward API variable");
            assert!(
                variable["valueFrom"]["fieldRef"]["fieldPath"].is_string(),
                "{name}: {identity} comes from the downward API"
            );
        }
        let service = one_of_kind(&objects, "Service");
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"], "metrics",
            "{name}"
        );
        assert_eq!(
            service["spec"]["selector"],
            deployment(&objects)["spec"]["selector"]["matchLabels"],
            "{name}: the Service selects the operator pods"
        );
    }
}

#[test]
fn gitlab_token_comes_from_a_secret_key_reference() {
    let Some(helm) = helm("gitlab_token_comes_from_a_secret_key_reference") else {
        return;
    };
    const TOKEN: &str = "glpat-chart-test-token";
    let with_token = render(
        &helm,
        &[
            "--set",
            "gitlab.url=https://gitlab.example.com",
            "--set",
            &format!("gitlab.token={TOKEN}"),
        ],
    );
    let secret = one_of_kind(&with_token, "Secret");
    assert!(
        secret["data"]["token"].is_string(),
        "the chart-created Secret holds the token under `token`"
    );
    let variable = env(&with_token, "GITLAB_TOKEN").expect("GITLAB_TOKEN");
    assert!(
        variable.get("value").is_none(),
        "no literal token in the pod spec"
    );
    assert_eq!(
        variable["valueFrom"]["secretKeyRef"],
        json!({"name": secret["metadata"]["name"], "key": "token"})
    );
    let rendered_deployment = deployment(&with_token).to_string();
    assert!(
        !rendered_deployment.contains(TOKEN),
        "the token never appears in the Deployment"
    );
    assert!(args(&with_token).contains(&"--gitlab-url=https://gitlab.example.com".to_owned()));

    let with_existing = render(&helm, NON_DEFAULT);
    assert!(
        of_kind(&with_existing, "Secret").is_empty(),
        "existingSecret: the chart creates no Secret"
    );
    assert_eq!(
        env(&with_existing, "GITLAB_TOKEN").expect("GITLAB_TOKEN")["valueFrom"]["secretKeyRef"],
        json!({"name": "gitlab-token", "key": "api-token"})
    );
}

#[test]
fn incomplete_connection_settings_are_refused_with_a_clear_message() {
    let Some(helm) = helm("incomplete_connection_settings_are_refused_with_a_clear_message") else {
        return;
    };
    let refused: [(&[&str], &str); 3] = [
        (
            &["--set", "gitlab.url=https://gitlab.example.com"],
            "gitlab.existingSecret",
        ),
        (
            &["--set", "gitlab.existingSecret=gitlab-token"],
            "gitlab.url",
        ),
        (
            &[
                "--set",
                "gitlab.url=https://gitlab.example.com",
                "--set",
                "gitlab.existingSecret=gitlab-token",
                "--set",
                "gitlab.caSecret=a",
                "--set",
                "gitlab.caConfigMap=b",
            ],
            "at most one of gitlab.caConfigMap and gitlab.caSecret",
        ),
    ];
    for (arguments, expected) in refused {
        let error = template(&helm, arguments).expect_err("helm template refuses");
        assert!(
            error.contains(expected),
            "{arguments:?}: message should mention {expected:?}: {error}"
        );
    }
}

#[test]
fn service_monitor_and_network_policy_render_only_when_enabled() {
    let Some(helm) = helm("service_monitor_and_network_policy_render_only_when_enabled") else {
        return;
    };
    let objects = render(&helm, NON_DEFAULT);
    let monitor = one_of_kind(&objects, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    let service = one_of_kind(&objects, "Service");
    for (label, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("selector")
    {
        assert_eq!(
            &service["metadata"]["labels"][label], value,
            "the ServiceMonitor selects the metrics Service"
        );
    }

    let policy = one_of_kind(&objects, "NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"port": "metrics", "protocol": "TCP"}]}]),
        "ingress only to the metrics port"
    );
    let egress = policy["spec"]["egress"].as_array().expect("egress");
    let ports: Vec<BTreeSet<(String, String)>> = egress
        .iter()
        .map(|rule| {
            rule["ports"]
                .as_array()
                .expect("every egress rule names its ports")
                .iter()
                .map(|port| (port["port"].to_string(), port["protocol"].to_string()))
                .collect()
        })
        .collect();
    let port = |number: u16, protocol: &str| (number.to_string(), format!("\"{protocol}\""));
    assert_eq!(
        ports,
        [
            BTreeSet::from([port(53, "UDP"), port(53, "TCP")]),
            BTreeSet::from([port(443, "TCP"), port(6443, "TCP")]),
            BTreeSet::from([port(443, "TCP")]),
        ],
        "egress to DNS, the kube-apiserver and GitLab only"
    );

    let narrowed = render(
        &helm,
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.gitlab.cidrs={203.0.113.0/24}",
            "--set",
            "networkPolicy.gitlab.ports={8443}",
        ],
    );
    let gitlab_rule = &one_of_kind(&narrowed, "NetworkPolicy")["spec"]["egress"][2];
    assert_eq!(
        gitlab_rule,
        &json!({"ports": [{"port": 8443, "protocol": "TCP"}],
                "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]})
    );
}

#[test]
fn helm_refuses_unknown_top_level_keys_and_bad_log_formats() {
    let Some(helm) = helm("helm_refuses_unknown_top_level_keys_and_bad_log_formats") else {
        return;
    };
    let chart = chart_argument();
    run_helm(&helm, &["lint", &chart]).expect("the chart lints with its defaults");
    let error = run_helm(&helm, &["lint", &chart, "--set", "replicas=2"])
        .expect_err("helm lint refuses an unknown top-level key");
    assert!(
        error.contains("replicas"),
        "the error names the key: {error}"
    );
    let error = template(&helm, &["--set", "logFormat=xml"])
        .expect_err("helm template refuses logFormat=xml");
    assert!(
        error.contains("logFormat"),
        "the error names the value: {error}"
    );
    let error = run_helm(&helm, &["lint", &chart, "--set", "logFormat=yaml"])
        .expect_err("helm lint refuses logFormat=yaml");
    assert!(
        error.contains("logFormat"),
        "the error names the value: {error}"
    );
    for format in ["text", "json"] {
        template(&helm, &["--set", &format!("logFormat={format}")])
            .unwrap_or_else(|e| panic!("logFormat={format} is accepted: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Alerts and dashboard: every query names only what the operator exports

/// Every sample name the operator's metrics registry exports, with the label names its
/// samples carry. Each family is recorded once through the real recording methods, so that
/// the exposition holds samples (and so label names) of all of them.
fn exported_metrics() -> BTreeMap<String, BTreeSet<String>> {
    use gitlab_registry_operator::controller::metrics::Metrics;
    use gitlab_registry_operator::gitlab::RequestObserver;
    use std::time::Duration;

    let metrics = Metrics::default();
    metrics.reconcile_started("Upstream");
    metrics.reconcile_finished("Upstream", Duration::from_millis(3), Some("RateLimited"));
    metrics.reconcile_finished("Upstream", Duration::from_millis(3), None);
    metrics.observe("GET", "/groups/:id", Some(200), Duration::from_millis(1));
    metrics.count_tags("kept", "KeepN", 1);
    metrics.count_run("Failed");
    metrics.count_pending_approvals(1);
    metrics.connectivity_checked("team", "quay", jiff::Timestamp::now());
    metrics.upstream_reachability("team", "quay", Some(false));
    let text = metrics.encode();

    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let (name, type_) = declaration.split_once(' ').expect("# TYPE name type");
            families.insert(name.to_owned(), type_.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).expect("a sample line");
            let labels: BTreeSet<String> = line[name_end..]
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .map(|(labels, _)| {
                    labels
                        .split(',')
                        .filter_map(|pair| pair.split_once('='))
                        .map(|(label, _)| label.to_owned())
                        .collect()
                })
                .unwrap_or_default();
            samples
                .entry(line[..name_end].to_owned())
                .or_default()
                .extend(labels);
        }
    }
    assert!(!families.is_empty(), "no metric family in {text}");
    for (family, type_) in &families {
        let suffixes: &[&str] = match type_.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for suffix in suffixes {
            assert!(
                samples.contains_key(&format!("{family}{suffix}")),
                "exported_metrics() records no sample of {family}{suffix}: record one, so its labels are known"
            );
        }
    }
    samples
}

/// A PromQL expression's metric names, the label names its selectors match on, and the label
/// names of its `by`/`without`/`on`/`ignoring` clauses.
struct QueryNames {
    metrics: BTreeSet<String>,
    selector_labels: BTreeMap<String, BTreeSet<String>>,
    grouping_labels: BTreeSet<String>,
}

/// The PromQL keywords followed by a list of label names.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn query_names(expr: &str) -> QueryNames {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = QueryNames {
        metrics: BTreeSet::new(),
        selector_labels: BTreeMap::new(),
        grouping_labels: BTreeSet::new(),
    };
    let mut rest = expr;
    while let Some(start) = rest.find(|c: char| is_name(c) || c == '"') {
        rest = &rest[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            // A string (a matcher's value): skipped whole.
            let end = quoted.find('"').expect("closed string");
            rest = &quoted[end + 1..];
            continue;
        }
        let end = rest.find(|c: char| !is_name(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        if word.starts_with("gitlab_registry_operator_") {
            names.metrics.insert(word.to_owned());
            if let Some(selector) = rest.strip_prefix('{') {
                let labels = names.selector_labels.entry(word.to_owned()).or_default();
                rest = selector_labels(selector, labels);
            }
        } else if GROUPING.contains(&word)
            && let Some(list) = rest.trim_start().strip_prefix('(')
        {
            let close = list.find(')').expect("closed label list");
            names.grouping_labels.extend(
                list[..close]
                    .split(',')
                    .map(|label| label.trim().to_owned())
                    .filter(|label| !label.is_empty()),
            );
            rest = &list[close + 1..];
        }
    }
    names
}

/// Reads the matchers `label op "value", ...}` after a selector's `{` into `labels`; returns
/// what follows the closing `}`.
fn selector_labels<'a>(selector: &'a str, labels: &mut BTreeSet<String>) -> &'a str {
    let mut rest = selector;
    loop {
        rest = rest.trim_start_matches([' ', ',', '\n']);
        if let Some(after) = rest.strip_prefix('}') {
            return after;
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .expect("a matcher");
        labels.insert(rest[..name_end].to_owned());
        let quote = rest.find('"').expect("a quoted matcher value");
        let mut escaped = false;
        let value_end = rest[quote + 1..]
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map(|(index, _)| quote + 1 + index)
            .expect("a closed matcher value");
        rest = &rest[value_end + 1..];
    }
}

/// Fails unless `expr` names only exported metrics and labels they carry; returns its metrics.
fn assert_query_uses_exported_names(
    what: &str,
    expr: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let names = query_names(expr);
    assert!(
        !names.metrics.is_empty(),
        "{what} queries no operator metric: {expr}"
    );
    let mut labels_of_query: BTreeSet<String> = BTreeSet::new();
    for metric in &names.metrics {
        let labels = exported.get(metric).unwrap_or_else(|| {
            panic!(
                "{what} queries {metric}, which the operator does not export (it exports {:?})",
                exported.keys().collect::<Vec<_>>()
            )
        });
        labels_of_query.extend(labels.iter().cloned());
        for label in names.selector_labels.get(metric).into_iter().flatten() {
            assert!(
                labels.contains(label),
                "{what} matches {metric} on label {label:?}, which it does not carry ({labels:?})"
            );
        }
    }
    for label in &names.grouping_labels {
        assert!(
            labels_of_query.contains(label),
            "{what} groups by {label:?}, a label none of {:?} carries",
            names.metrics
        );
    }
    names.metrics
}

#[test]
fn query_names_are_read_from_promql() {
    let names = query_names(
        r#"sum by (kind, le) (rate(gitlab_registry_operator_x_bucket{kind=~"Up|Down", reason!="a,b}"}[5m])) unless on (kind) gitlab_registry_operator_y > 3"#,
    );
    assert_eq!(
        names.metrics,
        BTreeSet::from([
            "gitlab_registry_operator_x_bucket".into(),
            "gitlab_registry_operator_y".into()
        ])
    );
    assert_eq!(
        names.selector_labels["gitlab_registry_operator_x_bucket"],
        BTreeSet::from(["kind".into(), "reason".into()])
    );
    assert_eq!(
        names.grouping_labels,
        BTreeSet::from(["kind".into(), "le".into()])
    );
    let exported = exported_metrics();
    assert!(
        exported["gitlab_registry_operator_reconcile_errors_total"]
            .is_superset(&BTreeSet::from(["kind".into(), "reason".into()])),
        "{exported:?}"
    );
    assert!(exported["gitlab_registry_operator_reconcile_duration_seconds_bucket"].contains("le"));
}

fn alert_rules(objects: &[Value]) -> BTreeMap<String, Value> {
    let rule = one_of_kind(objects, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules").iter())
        .map(|rule| {
            (
                rule["alert"].as_str().expect("alert name").to_owned(),
                rule.clone(),
            )
        })
        .collect()
}

#[test]
fn prometheus_rule_alerts_on_what_the_operator_exports() {
    let Some(helm) = helm("prometheus_rule_alerts_on_what_the_operator_exports") else {
        return;
    };
    assert!(
        of_kind(&render(&helm, &[]), "PrometheusRule").is_empty(),
        "no PrometheusRule unless asked for"
    );
    let exported = exported_metrics();
    let objects = render(
        &helm,
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.labels.release=prometheus",
        ],
    );
    assert_eq!(
        one_of_kind(&objects, "PrometheusRule")["metadata"]["labels"]["release"],
        "prometheus"
    );
    let rules = alert_rules(&objects);
    let expected = [
        "GitLabRegistryOperatorReconcileErrors",
        "GitLabRegistryOperatorGitLabUnavailable",
        "GitLabRegistryOperatorGitLabRateLimited",
        "GitLabRegistryOperatorUpstreamUnreachable",
        "GitLabRegistryOperatorCleanupFailed",
        "GitLabRegistryOperatorCleanupNeedsApproval",
        "GitLabRegistryOperatorNoSuccessfulReconcile",
    ];
    assert_eq!(
        rules.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(expected)
    );
    for (alert, rule) in &rules {
        let expr = rule["expr"].as_str().expect("expr");
        assert_query_uses_exported_names(alert, expr, &exported);
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{alert}: severity"
        );
        for annotation in ["summary", "description"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or("");
            assert!(!text.is_empty(), "{alert}: {annotation}");
            assert!(
                !text.contains("<no value>"),
                "{alert}: Helm ate a Prometheus template: {text}"
            );
        }
    }
    let expr = |alert: &str| rules[alert]["expr"].as_str().expect("expr").to_owned();
    assert!(expr("GitLabRegistryOperatorReconcileErrors").contains("by (kind, reason)"));
    assert!(expr("GitLabRegistryOperatorReconcileErrors").contains("[15m]"));
    assert!(
        rules["GitLabRegistryOperatorReconcileErrors"]["annotations"]["summary"]
            .as_str()
            .is_some_and(|summary| summary.contains("{{ $labels.reason }}"))
    );
    assert!(expr("GitLabRegistryOperatorGitLabUnavailable").contains(r#"status=~"5..|none""#));
    assert!(expr("GitLabRegistryOperatorGitLabRateLimited").contains(r#"status="429""#));
    assert_eq!(
        rules["GitLabRegistryOperatorUpstreamUnreachable"]["for"],
        "30m"
    );
    assert!(expr("GitLabRegistryOperatorUpstreamUnreachable").contains("== 0"));
    assert!(expr("GitLabRegistryOperatorCleanupFailed").contains(r#"outcome="Failed""#));
    assert!(
        expr("GitLabRegistryOperatorCleanupNeedsApproval").contains(r#"outcome="NeedsApproval""#)
    );

    // "3 resyncs" follows the resync the Deployment passes.
    for (resync, seconds) in [
        ("10m", 1800),
        ("1h30m", 16200),
        ("45s", 135),
        ("1d", 259200),
    ] {
        let objects = render(
            &helm,
            &[
                "--set",
                "prometheusRule.enabled=true",
                "--set",
                &format!("resync={resync}"),
            ],
        );
        let expr = alert_rules(&objects)["GitLabRegistryOperatorNoSuccessfulReconcile"]["expr"]
            .as_str()
            .expect("expr")
            .to_owned();
        assert!(
            expr.contains(&format!("[{seconds}s]")) && expr.contains(&format!("< {seconds})")),
            "resync {resync}: 3 resyncs are {seconds}s: {expr}"
        );
        assert!(args(&objects).contains(&format!("--resync={resync}")));
    }
}

/// A tool from `$variable`, else `binary` on `PATH`; `None` (after saying why and how to
/// get it) when there is none, so the caller skips.
fn tool(variable: &str, binary: &str, test: &str, how: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable).filter(|path| !path.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED {test}: no {binary} ({how}, or set {variable})");
    }
    found
}

fn promtool(test: &str) -> Option<PathBuf> {
    tool("PROMTOOL", "promtool", test, "apt-get install prometheus")
}

/// One alert unit test for `promtool test rules`: input series (`series`, `values`), then
/// at `eval_time` exactly the alerts `alert` with these extra labels (severity aside).
fn alert_case(series: &[(&str, &str)], eval_time: &str, alert: &str, firing: &[Value]) -> Value {
    json!({
        "interval": "1m",
        "input_series": series
            .iter()
            .map(|(series, values)| json!({"series": series, "values": values}))
            .collect::<Vec<_>>(),
        "alert_rule_test": [{
            "eval_time": eval_time,
            "alertname": alert,
            "exp_alerts": firing.iter().map(|labels| json!({"exp_labels": labels})).collect::<Vec<_>>(),
        }],
    })
}

#[test]
fn alerts_fire_when_and_only_when_they_should() {
    let Some(helm) = helm("alerts_fire_when_and_only_when_they_should") else {
        return;
    };
    let Some(promtool) = promtool("alerts_fire_when_and_only_when_they_should") else {
        return;
    };
    // The default resync (10m): 3 resyncs are 30 minutes.
    let objects = render(&helm, &["--set", "prometheusRule.enabled=true"]);
    let spec = &one_of_kind(&objects, "PrometheusRule")["spec"];
    let dir = std::env::temp_dir().join(format!("gro-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // JSON is YAML: promtool reads both.
    let rules_file = dir.join("rules.json");
    std::fs::write(&rules_file, spec.to_string()).expect("rules written");
    let rules_path = rules_file.to_string_lossy().into_owned();
    run_helm(&promtool, &["check", "rules", &rules_path])
        .unwrap_or_else(|e| panic!("promtool check rules refuses the PrometheusRule: {e}"));

    // promtool compares annotations too; their templates were checked above.
    let mut bare = spec.clone();
    for group in bare["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            rule.as_object_mut().expect("rule").remove("annotations");
        }
    }
    std::fs::write(dir.join("bare.json"), bare.to_string()).expect("rules written");
    let m = |name: &str| format!("gitlab_registry_operator_{name}");
    let warning = |labels: Value| {
        let mut labels = labels;
        labels["severity"] = json!("warning");
        labels
    };
    let critical = |labels: Value| {
        let mut labels = labels;
        labels["severity"] = json!("critical");
        labels
    };
    let errors = m("reconcile_errors_total{kind=\"Upstream\",reason=\"Unauthorized\"}");
    let reachable = |name: &str| {
        m(&format!(
            "upstream_reachable{{namespace=\"team\",name=\"{name}\"}}"
        ))
    };
    let requests = |status: &str| {
        m(&format!(
            "gitlab_requests_total{{method=\"GET\",route=\"/groups/:id\",status=\"{status}\"}}"
        ))
    };
    let runs = |outcome: &str| m(&format!("cleanup_runs_total{{outcome=\"{outcome}\"}}"));
    let reconciles = m("reconciles_total{kind=\"VirtualRegistry\"}");
    let last_success = m("last_successful_reconcile_timestamp_seconds{kind=\"VirtualRegistry\"}");
    let registry = json!({"kind": "VirtualRegistry"});
    let tests = [
        alert_case(
            &[(&errors, "0+1x20")],
            "10m",
            "GitLabRegistryOperatorReconcileErrors",
            &[warning(
                json!({"kind": "Upstream", "reason": "Unauthorized"}),
            )],
        ),
        alert_case(
            &[(&errors, "3x40")],
            "30m",
            "GitLabRegistryOperatorReconcileErrors",
            &[],
        ),
        alert_case(
            &[
                (&reachable("quay"), "0x40"),
                (&reachable("dockerhub"), "1x40"),
            ],
            "31m",
            "GitLabRegistryOperatorUpstreamUnreachable",
            &[warning(json!({"namespace": "team", "name": "quay"}))],
        ),
        alert_case(
            &[(&reachable("quay"), "0x40")],
            "25m",
            "GitLabRegistryOperatorUpstreamUnreachable",
            &[],
        ),
        alert_case(
            &[
                (&requests("502"), "0+10x30"),
                (&requests("none"), "0+10x30"),
                (&requests("200"), "0+5x30"),
            ],
            "20m",
            "GitLabRegistryOperatorGitLabUnavailable",
            &[critical(json!({}))],
        ),
        alert_case(
            &[(&requests("502"), "0+1x30"), (&requests("200"), "0+10x30")],
            "20m",
            "GitLabRegistryOperatorGitLabUnavailable",
            &[],
        ),
        alert_case(
            &[(&requests("429"), "0+1x40"), (&requests("200"), "0+10x40")],
            "30m",
            "GitLabRegistryOperatorGitLabRateLimited",
            &[warning(json!({}))],
        ),
        alert_case(
            &[
                (&runs("Failed"), "0 0 1 1 1"),
                (&runs("Succeeded"), "0 1 2 3 4"),
            ],
            "4m",
            "GitLabRegistryOperatorCleanupFailed",
            &[warning(json!({}))],
        ),
        alert_case(
            &[(&runs("Succeeded"), "0 1 2 3 4")],
            "4m",
            "GitLabRegistryOperatorCleanupFailed",
            &[],
        ),
        alert_case(
            &[(&runs("NeedsApproval"), "0 0 1 1 1")],
            "4m",
            "GitLabRegistryOperatorCleanupNeedsApproval",
            &[warning(json!({}))],
        ),
        // Reconciles run every minute; the last success was at the start: fires after 30 min.
        alert_case(
            &[(&reconciles, "0+10x60"), (&last_success, "0x60")],
            "40m",
            "GitLabRegistryOperatorNoSuccessfulReconcile",
            &[critical(registry.clone())],
        ),
        alert_case(
            &[(&reconciles, "0+10x60"), (&last_success, "0x60")],
            "25m",
            "GitLabRegistryOperatorNoSuccessfulReconcile",
            &[],
        ),
        // Failing from the start, never a success: fires too.
        alert_case(
            &[(&reconciles, "0+10x60")],
            "40m",
            "GitLabRegistryOperatorNoSuccessfulReconcile",
            &[critical(registry)],
        ),
        // Succeeding every minute: quiet.
        alert_case(
            &[(&reconciles, "0+10x60"), (&last_success, "0+60x60")],
            "40m",
            "GitLabRegistryOperatorNoSuccessfulReconcile",
            &[],
        ),
        // Every object deleted long ago, nothing left to reconcile: quiet.
        alert_case(
            &[(&reconciles, "50x60"), (&last_success, "0x60")],
            "40m",
            "GitLabRegistryOperatorNoSuccessfulReconcile",
            &[],
        ),
    ];
    let unit_tests = json!({
        "rule_files": ["bare.json"],
        "evaluation_interval": "1m",
        "tests": tests,
    });
    let tests_file = dir.join("tests.json");
    std::fs::write(&tests_file, unit_tests.to_string()).expect("tests written");
    let result = run_helm(&promtool, &["test", "rules", &tests_file.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap_or_else(|e| panic!("promtool test rules: {e}"));
}

/// The queries of every panel of the dashboard file, by panel title.
fn dashboard_queries() -> Vec<(String, String)> {
    let file = std::fs::read_to_string(chart_path("dashboards/gitlab-registry-operator.json"))
        .expect("dashboard file");
    let dashboard: Value = serde_json::from_str(&file).expect("dashboard is JSON");
    let mut queries = Vec::new();
    let mut panels: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("untitled").to_owned();
            queries.push((title, target["expr"].as_str().expect("expr").to_owned()));
        }
    }
    queries
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let Some(promtool) = promtool("dashboard_queries_are_valid_promql") else {
        return;
    };
    // Each query as a recording rule, Grafana's interval variables as a plain range.
    let rules: Vec<Value> = dashboard_queries()
        .iter()
        .enumerate()
        .map(|(index, (_, expr))| {
            json!({"record": format!("dashboard:query_{index}"),
                   "expr": expr.replace("$__rate_interval", "5m").replace("$__range", "1h")})
        })
        .collect();
    assert!(!rules.is_empty(), "the dashboard has queries");
    let file = std::env::temp_dir().join(format!("gro-dashboard-{}.json", std::process::id()));
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .expect("written");
    let result = run_helm(&promtool, &["check", "rules", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    result.unwrap_or_else(|e| panic!("a dashboard query is not valid PromQL: {e}"));
}

#[test]
fn grafana_dashboard_is_a_sidecar_configmap_querying_exported_metrics() {
    let Some(helm) = helm("grafana_dashboard_is_a_sidecar_configmap_querying_exported_metrics")
    else {
        return;
    };
    assert!(
        of_kind(&render(&helm, &[]), "ConfigMap").is_empty(),
        "no dashboard unless asked for"
    );
    let objects = render(
        &helm,
        &[
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            "grafanaDashboard.namespace=monitoring",
            "--set",
            "grafanaDashboard.annotations.grafana_folder=Operators",
        ],
    );
    let config_map = one_of_kind(&objects, "ConfigMap");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(config_map["metadata"]["namespace"], "monitoring");
    assert_eq!(
        config_map["metadata"]["annotations"]["grafana_folder"],
        "Operators"
    );
    let data = config_map["data"].as_object().expect("data");
    assert_eq!(data.len(), 1, "one dashboard");
    let (key, json_text) = data.iter().next().expect("the dashboard");
    assert!(key.ends_with(".json"), "{key}");
    let file = std::fs::read_to_string(chart_path("dashboards/gitlab-registry-operator.json"))
        .expect("dashboard file");
    assert_eq!(
        json_text.as_str().expect("text").trim_end(),
        file.trim_end()
    );
    let dashboard: Value = serde_json::from_str(&file).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "gitlab-registry-operator");
    assert!(
        dashboard["templating"]["list"]
            .as_array()
            .expect("variables")
            .iter()
            .any(|variable| variable["type"] == "datasource" && variable["name"] == "datasource"),
        "a data source variable"
    );

    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        if panel["type"] != "row" {
            let title = &panel["title"];
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                panel["targets"]
                    .as_array()
                    .is_some_and(|targets| !targets.is_empty()),
                "{title} has no query"
            );
        }
    }
    let exported = exported_metrics();
    let mut queried = BTreeSet::new();
    for (title, expr) in dashboard_queries() {
        queried.extend(assert_query_uses_exported_names(&title, &expr, &exported));
    }
    // Every family is on the dashboard (a histogram through its buckets).
    for sample in exported.keys() {
        let family = sample
            .strip_suffix("_sum")
            .or_else(|| sample.strip_suffix("_count"))
            .unwrap_or(sample);
        assert!(
            queried.contains(sample)
                || queried.contains(&format!("{family}_bucket"))
                || queried.contains(family),
            "the dashboard shows nothing of {sample}"
        );
    }
}

#[test]
fn service_monitor_keeps_the_upstream_namespace_label() {
    let Some(helm) = helm("service_monitor_keeps_the_upstream_namespace_label") else {
        return;
    };
    let objects = render(&helm, &["--set", "serviceMonitor.enabled=true"]);
    let monitor = one_of_kind(&objects, "ServiceMonitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["honorLabels"], true,
        "without honorLabels Prometheus renames the Upstream's namespace label exported_namespace"
    );
    assert!(
        exported_metrics()["gitlab_registry_operator_upstream_reachable"].contains("namespace")
    );
}

// ---------------------------------------------------------------------------------------------
// Argo CD health script

const HEALTH_SCRIPT: &str = "argocd/health.lua";
const KINDS: [&str; 3] = ["VirtualRegistry", "Upstream", "CleanupPolicy"];

fn lua(test: &str) -> Option<PathBuf> {
    tool("LUA", "lua5.4", test, "apt-get install lua5.4")
}

/// A Lua literal of a JSON value (`null` becomes `nil`, which leaves a table key unset).
fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        // Bytes other than printable ASCII, quotes and backslashes as decimal escapes.
        Value::String(text) => {
            let mut literal = String::from("\"");
            for byte in text.bytes() {
                if (byte.is_ascii_graphic() && byte != b'"' && byte != b'\\') || byte == b' ' {
                    literal.push(char::from(byte));
                } else {
                    literal.push_str(&format!("\\{byte:03}"));
                }
            }
            literal.push('"');
            literal
        }
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(key, value)| format!(
                    "[{}] = {}",
                    lua_literal(&json!(key)),
                    lua_literal(value)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// (status, message) of the chart's health script run by Lua on `object`, as Argo CD runs it:
/// the object in the global `obj`, the script's returned table read back.
fn health(lua: &Path, object: &Value) -> (String, String) {
    use std::io::Write;
    let script = chart_path(HEALTH_SCRIPT);
    let harness = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua_literal(object),
        lua_literal(&json!(script.to_string_lossy()))
    );
    let mut child = Command::new(lua)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", lua.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(harness.as_bytes())
        .expect("harness written");
    let output = child.wait_with_output().expect("lua ran");
    assert!(
        output.status.success(),
        "{HEALTH_SCRIPT} fails on {object}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let (status, message) = stdout.split_once('\n').expect("status and message");
    (status.to_owned(), message.to_owned())
}

fn sample(kind: &str, generation: i64, suspend: bool, status: Value) -> Value {
    json!({
        "apiVersion": "gitlabregistry.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "sample", "namespace": "team", "generation": generation},
        "spec": {"suspend": suspend},
        "status": status,
    })
}

fn ready(status: &str, reason: &str, message: &str, generation: i64) -> Value {
    json!({"type": "Ready", "status": status, "reason": reason, "message": message,
           "observedGeneration": generation, "lastTransitionTime": "2026-12-01T10:00:00Z"})
}

#[test]
fn argocd_health_follows_ready_generation_waiting_reasons_and_suspend() {
    let Some(lua) = lua("argocd_health_follows_ready_generation_waiting_reasons_and_suspend")
    else {
        return;
    };
    assert_eq!(lua_literal(&json!("a \"é\n")), r#""a \034\195\169\010""#);
    for kind in KINDS {
        let status_with = |observed: i64, conditions: Value| json!({"observedGeneration": observed, "conditions": conditions});
        // Generation 2, observed, with only this Ready.
        let settled = |status: &str, reason: &str, message: &str| {
            sample(
                kind,
                2,
                false,
                status_with(2, json!([ready(status, reason, message, 2)])),
            )
        };
        let healthy = status_with(
            4,
            json!([
                {"type": "Synced", "status": "True", "reason": "Synced", "message": "", "observedGeneration": 4},
                ready("True", "Synced", "in line with the spec", 4),
            ]),
        );
        let only_synced = status_with(
            2,
            json!([{"type": "Synced", "status": "False", "reason": "InvalidSpec", "message": "bad", "observedGeneration": 2}]),
        );
        let unauthorized = status_with(2, json!([ready("False", "Unauthorized", "401", 2)]));
        let cases = [
            (
                "Ready=True of the current generation",
                sample(kind, 4, false, healthy),
                "Healthy",
                "in line with the spec",
            ),
            (
                "no status yet",
                sample(kind, 1, false, Value::Null),
                "Progressing",
                "Waiting for the operator to report conditions",
            ),
            (
                "no conditions yet",
                sample(kind, 1, false, json!({"conditions": []})),
                "Progressing",
                "Waiting for the operator to report conditions",
            ),
            (
                "observedGeneration behind",
                sample(
                    kind,
                    5,
                    false,
                    status_with(4, json!([ready("True", "Synced", "in line", 4)])),
                ),
                "Progressing",
                "Waiting for the operator to observe generation 5",
            ),
            (
                "Ready of an older generation",
                sample(
                    kind,
                    5,
                    false,
                    status_with(5, json!([ready("True", "Synced", "in line", 4)])),
                ),
                "Progressing",
                "Waiting for Ready of generation 5",
            ),
            (
                "waiting for a registry",
                settled("False", "WaitingForRegistry", "no registry lists it"),
                "Progressing",
                "WaitingForRegistry: no registry lists it",
            ),
            (
                "waiting for an upstream",
                settled("False", "WaitingForUpstream", "quay has no id yet"),
                "Progressing",
                "WaitingForUpstream: quay has no id yet",
            ),
            (
                "a component not known yet",
                settled("Unknown", "Pending", "Reachable is not known yet"),
                "Progressing",
                "Pending: Reachable is not known yet",
            ),
            (
                "GitLab refused",
                settled("False", "Unauthorized", "401 Unauthorized"),
                "Degraded",
                "Unauthorized: 401 Unauthorized",
            ),
            (
                "no Ready among other conditions",
                sample(kind, 2, false, only_synced),
                "Progressing",
                "Waiting for the Ready condition",
            ),
            (
                "suspended, whatever the status says",
                sample(kind, 3, true, unauthorized),
                "Suspended",
                "spec.suspend is true: the operator sends nothing to GitLab",
            ),
        ];
        for (case, object, expected_status, expected_message) in cases {
            let (status, message) = health(&lua, &object);
            assert_eq!(
                (status.as_str(), message.as_str()),
                (expected_status, expected_message),
                "{kind}, {case}"
            );
        }
    }
}

#[test]
fn health_script_waits_only_on_reasons_the_operator_reports() {
    let script = std::fs::read_to_string(chart_path(HEALTH_SCRIPT)).expect("health.lua");
    let table = script
        .split_once("local waiting_reasons = {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(table, _)| table)
        .expect("a waiting_reasons table");
    let reasons: Vec<&str> = table
        .lines()
        .filter_map(|line| line.trim().strip_suffix(" = true,"))
        .collect();
    assert!(reasons.contains(&"WaitingForRegistry"), "{reasons:?}");
    let mut sources = String::new();
    let mut dirs = vec![repo_path("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                // The simulator plays GitLab; its strings are not the operator's reasons.
                if !path.ends_with("sim") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                sources.push_str(&std::fs::read_to_string(&path).expect("readable"));
            }
        }
    }
    for reason in reasons {
        assert!(
            sources.contains(&format!("\"{reason}\"")),
            "{HEALTH_SCRIPT} waits on {reason}, a reason no code in src/ reports"
        );
    }
}

#[test]
fn readme_shows_the_health_script_for_each_kind_as_it_is() {
    let script = std::fs::read_to_string(chart_path(HEALTH_SCRIPT)).expect("health.lua");
    let readme = std::fs::read_to_string(chart_path("README.md")).expect("README.md");
    let block = readme
        .split_once("\n## Argo CD health\n")
        .and_then(|(_, section)| section.split_once("```yaml\n"))
        .and_then(|(_, block)| block.split_once("\n```\n"))
        .map(|(block, _)| block)
        .expect("README.md has an `## Argo CD health` section with a yaml block");
    let config_map: Value = serde_saphyr::from_str(block).expect("the block is YAML");
    assert_eq!(config_map["kind"], "ConfigMap");
    assert_eq!(config_map["metadata"]["name"], "argocd-cm");
    let data = config_map["data"].as_object().expect("data");
    let expected: BTreeSet<String> = KINDS
        .iter()
        .map(|kind| format!("resource.customizations.health.gitlabregistry.io_{kind}"))
        .collect();
    assert_eq!(data.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (key, copy) in data {
        assert_eq!(
            copy.as_str(),
            Some(script.as_str()),
            "README.md's {key} differs from {HEALTH_SCRIPT}: paste the file again"
        );
    }
}

#[test]
fn an_access_policy_is_rendered_into_a_config_map_mounted_as_a_directory_and_passed() {
    let Some(helm) =
        helm("an_access_policy_is_rendered_into_a_config_map_mounted_as_a_directory_and_passed")
    else {
        return;
    };
    let values = chart_path("ci/shared-cluster-values.yaml");
    let objects = render(&helm, &["-f", &values.to_string_lossy()]);
    let config_map = one_of_kind(&objects, "ConfigMap");
    let text = config_map["data"]["access.yaml"]
        .as_str()
        .expect("access.yaml in the ConfigMap");
    let policy = gitlab_registry_operator::tenancy::AccessPolicy::parse("access.yaml", text)
        .expect("the rendered policy is one the operator reads");
    let group = |path: &str| gitlab_registry_operator::tenancy::Target::Group(path.into());
    assert!(policy.permits("team-a", &group("team-a-org")));
    assert!(!policy.permits("team-a", &group("team-b-org")));
    assert!(policy.permits("anyone", &group("shared-cache")));
    assert!(
        args(&objects)
            .contains(&"--access-policy=/etc/gitlab-registry-operator/access/access.yaml".into())
    );
    let pod = &deployment(&objects)["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .and_then(|volumes| volumes.iter().find(|v| v["name"] == "access-policy"))
        .expect("access-policy volume");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    let mount = container(&objects)["volumeMounts"]
        .as_array()
        .and_then(|mounts| mounts.iter().find(|m| m["name"] == "access-policy"))
        .expect("access-policy mount");
    assert_eq!(mount["mountPath"], "/etc/gitlab-registry-operator/access");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount would never see the ConfigMap change"
    );

    let default = render(&helm, &[]);
    assert!(of_kind(&default, "ConfigMap").is_empty());
    assert!(
        !args(&default)
            .iter()
            .any(|a| a.starts_with("--access-policy"))
    );
}
