//! The Helm chart in `charts/gitlab-registry-operator`: its CRDs are copies of `crds/`, its
//! README documents exactly the values in `values.yaml`, its schema covers and checks every
//! value, and (with a helm binary) what it renders: least-privilege RBAC without wildcards, a
//! hardened Deployment passing the flags `run` takes, the token from a Secret, and the
//! optional ServiceMonitor and NetworkPolicy.

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

/// The helm binary: `$HELM`, else `.ci/bin/helm` (from `bash .ci/install-helm`), else `helm` on
/// `PATH`. `None` (after saying why) when there is none, so the caller skips.
fn helm(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HELM").filter(|path| !path.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let installed = repo_path(".ci/bin/helm");
    if installed.is_file() {
        return Some(installed);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("helm"))
            .find(|candidate| candidate.is_file())
    });
    if on_path.is_none() {
        eprintln!(
            "SKIPPED {test}: no helm binary (set HELM, run `bash .ci/install-helm`, or put helm on PATH)"
        );
    }
    on_path
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
    for kind in ["virtualregistries", "upstreams", "cleanuppolicies"] {
        grant(
            "gitlabregistry.io",
            kind,
            &["get", "list", "watch", "patch", "update"],
        );
        grant(
            "gitlabregistry.io",
            &format!("{kind}/status"),
            &["get", "patch", "update"],
        );
        grant(
            "gitlabregistry.io",
            &format!("{kind}/finalizers"),
            &["update"],
        );
    }
    grant("", "secrets", &["get", "list", "watch"]);
    grant("", "pods", &["list", "watch"]);
    grant("", "events", &["create", "patch"]);
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
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "create", "update"]}])
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
