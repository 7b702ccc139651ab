//! `apply` and `plan` through the real binary, against the simulator over loopback (and, for
//! the README's first command, against the embedded default).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gitlab_registry_operator::sim::{Seed, SimConfig, SimHandle, Simulator};
use secrecy::ExposeSecret;

const BINARY: &str = env!("CARGO_BIN_EXE_gitlab-registry-operator");

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// The examples without the CleanupPolicies (their runs are covered by the cleanup tests).
fn registry_examples(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("temp dir");
    for entry in std::fs::read_dir(examples()).expect("examples") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("cleanuppolicy") {
            std::fs::copy(&path, dir.join(&name)).expect("copy");
        }
    }
    dir.to_path_buf()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gro-standalone-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn simulator() -> SimHandle {
    Simulator::start(SimConfig::embedded_demo(), Seed::demo())
        .await
        .expect("simulator starts")
}

fn run(sim: Option<&SimHandle>, args: &[&str]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .env_remove("GITLAB_URL")
        .env_remove("GITLAB_TOKEN")
        .env_remove("RUST_LOG");
    if let Some(sim) = sim {
        command
            .env("GITLAB_URL", sim.base_url())
            .env("GITLAB_TOKEN", sim.config().token.expose_secret());
    }
    command.output().expect("binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_then_plan_reports_no_change_and_plan_only_reads() {
    let sim = simulator().await;
    let dir_arg = examples().to_string_lossy().into_owned();

    let output = tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg]));
    assert_eq!(
        output.status.code(),
        Some(0),
        "apply: {}\n{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = stdout(&output);
    for line in text.lines().skip(1).take_while(|line| !line.is_empty()) {
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("True"),
            "every object Ready: {text}"
        );
    }
    assert!(
        text.contains("VirtualRegistry/default/docker-cache"),
        "{text}"
    );
    assert!(
        !text.contains("embedded GitLab simulator"),
        "a GitLab URL was given: {text}"
    );
    let state = sim.snapshot();
    let state = serde_json::to_value(&state).expect("snapshot serialises");
    let registries = state["registries"].as_array().cloned().unwrap_or_default();
    assert_eq!(registries.len(), 1, "{state:#}");

    sim.reset_request_counts();
    let output = tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg]));
    let text = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "second plan must see no change: {text}"
    );
    assert!(text.contains("No changes"), "{text}");
    let counts = sim.request_counts();
    assert!(!counts.is_empty());
    for route in counts.keys() {
        assert!(route.starts_with("GET "), "plan sent {route}");
    }

    // A second apply changes nothing either: zero writes.
    sim.reset_request_counts();
    let output = tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(0));
    let writes: Vec<_> = sim
        .request_counts()
        .into_iter()
        .filter(|(route, _)| !route.starts_with("GET ") && !route.ends_with("/test"))
        .collect();
    assert!(writes.is_empty(), "steady-state apply wrote: {writes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_manifest_shows_exactly_that_change() {
    let sim = simulator().await;
    let dir = registry_examples(&temp_dir("change"));
    let dir_arg = dir.to_string_lossy().into_owned();
    let output = tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));

    let quay = dir.join("upstream-quay.yaml");
    let text = std::fs::read_to_string(&quay)
        .expect("quay example")
        .replace("cacheValidityHours: 48", "cacheValidityHours: 72");
    std::fs::write(&quay, text).expect("write");
    sim.reset_request_counts();
    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg, "-o", "json"]));
    assert_eq!(
        output.status.code(),
        Some(2),
        "a change means exit 2: {}",
        stdout(&output)
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&output)).expect("json output parses");
    let changed: Vec<&serde_json::Value> = report["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .filter(|o| {
            o["actions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["writes"] == true))
        })
        .collect();
    assert_eq!(changed.len(), 1, "only quay changes: {report:#}");
    assert_eq!(changed[0]["name"], "quay");
    let update = changed[0]["actions"]
        .as_array()
        .and_then(|actions| actions.iter().find(|a| a["writes"] == true))
        .expect("a writing action");
    assert_eq!(update["reason"], "Updated");
    let changes = &update["changes"];
    assert_eq!(changes.as_array().map(Vec::len), Some(1), "{changes:#}");
    assert_eq!(changes[0]["field"], "cacheValidityHours");
    assert_eq!(changes[0]["from"], "48");
    assert_eq!(changes[0]["to"], "72");
    assert!(
        sim.request_counts()
            .keys()
            .all(|route| route.starts_with("GET "))
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn invalid_manifests_fail_with_file_and_field() {
    let dir = temp_dir("invalid");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("registry.yaml"),
        "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {name: cache}\nspec: {group: my-org, upstreams: [{name: ghost}]}\n",
    )
    .expect("write");
    let output = run(None, &["plan", "-f", &dir.to_string_lossy()]);
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("registry.yaml")
            && error.contains("spec.upstreams[0].name")
            && error.contains("ghost"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_readme_first_command_works_on_the_embedded_default() {
    let output = run(None, &["apply", "-f", &examples().to_string_lossy()]);
    let text = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("embedded GitLab simulator"), "{text}");
    assert!(
        text.contains("connection test: GitLab reached the upstream"),
        "{text}"
    );
    for object in [
        "Upstream/default/dockerhub",
        "Upstream/default/quay",
        "VirtualRegistry/default/docker-cache",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(object))
            .unwrap_or_else(|| panic!("{object} missing: {text}"));
        assert!(line.contains("True"), "{line}");
    }
    assert!(
        !text.contains("dckr_pat_example-token"),
        "a password was printed"
    );
}

/// The README's `sim` commands: start the binary, then the same requests as the curl lines.
#[tokio::test(flavor = "multi_thread")]
async fn sim_command_serves_the_api_as_the_readme_shows() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(BINARY)
        .args(["sim", "--listen", "127.0.0.1:0", "--token", "demo-token"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sim starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let base = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    let http = reqwest::Client::new();
    let upstreams: serde_json::Value = http
        .get(format!(
            "{base}/api/v4/groups/my-org/-/virtual_registries/container/upstreams"
        ))
        .header("PRIVATE-TOKEN", "demo-token")
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(upstreams[0]["name"], "Docker Hub");
    let created = http
        .post(format!(
            "{base}/api/v4/groups/my-org/-/virtual_registries/container/registries"
        ))
        .header("PRIVATE-TOKEN", "demo-token")
        .json(&serde_json::json!({"name": "docker-cache"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(created.status(), 201);
    let unauthorized = http
        .get(format!(
            "{base}/api/v4/groups/my-org/-/virtual_registries/container/registries"
        ))
        .send()
        .await
        .expect("answers");
    assert_eq!(unauthorized.status(), 401);
    let faults = http
        .post(format!("{base}/-/sim/faults"))
        .json(&serde_json::json!({"once": [{"count": 2, "fault": {"kind": "status", "status": 503}}]}))
        .send()
        .await
        .expect("answers");
    assert!(faults.status().is_success());
    let failed = http
        .get(format!(
            "{base}/api/v4/groups/my-org/-/virtual_registries/container/registries"
        ))
        .header("PRIVATE-TOKEN", "demo-token")
        .send()
        .await
        .expect("answers");
    assert_eq!(failed.status(), 503);
    let counts: serde_json::Value = http
        .get(format!("{base}/-/sim/requests"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert!(
        counts["POST /groups/:id/-/virtual_registries/container/registries"].as_u64() >= Some(1),
        "{counts}"
    );
    let state: serde_json::Value = http
        .get(format!("{base}/-/sim/state"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert!(state.to_string().contains("docker-cache"));
    // SIGTERM stops it.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::block_in_place(|| child.wait()).expect("exits");
    assert!(status.success(), "sim exits 0 on SIGTERM: {status:?}");
}

/// Every command documents itself; `run --help` lists the flags the Helm chart passes.
#[test]
fn help_texts_describe_every_command_and_flag() {
    let top = stdout(&run(None, &["--help"]));
    for command in ["run", "crds", "apply", "plan", "sim"] {
        assert!(top.contains(command), "{command} in --help: {top}");
    }
    let run_help = stdout(&run(None, &["run", "--help"]));
    for flag in [
        "--gitlab-url",
        "--gitlab-ca-file",
        "--resync",
        "--metrics-addr",
        "--leader-election",
        "--leader-election-namespace",
        "--log-format",
        "--watch-namespace",
    ] {
        assert!(run_help.contains(flag), "{flag} in run --help: {run_help}");
    }
    assert!(
        !run_help.contains("--gitlab-token"),
        "the token is taken from the environment only"
    );
    let plan_help = stdout(&run(None, &["plan", "--help"]));
    assert!(
        plan_help.contains("--filename") && plan_help.contains("--output"),
        "{plan_help}"
    );
    let sim_help = stdout(&run(None, &["sim", "--help"]));
    assert!(
        sim_help.contains("--allow-local-network") && sim_help.contains("--seed"),
        "{sim_help}"
    );
}

/// `run` without a cluster says what to do instead of panicking.
#[test]
fn run_without_a_cluster_explains_how_to_fix_it() {
    let output = Command::new(BINARY)
        .args(["run", "--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("cannot reach Kubernetes") && error.contains("KUBECONFIG"),
        "{error}"
    );
}

// ---- Tenancy -----------------------------------------------------------------------------

fn registry_manifest(namespace: &str, name: &str, group: &str, gitlab_name: &str) -> String {
    format!(
        "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{group: {group}, name: {gitlab_name}}}\n"
    )
}

#[test]
fn two_manifests_claiming_one_gitlab_registry_are_an_error_naming_both_files() {
    let dir = temp_dir("one-owner");
    std::fs::create_dir_all(&dir).expect("dir");
    let first = dir.join("team-a.yaml");
    let second = dir.join("team-b.yaml");
    std::fs::write(
        &first,
        registry_manifest("team-a", "cache", "my-org", "shared"),
    )
    .expect("a");
    std::fs::write(
        &second,
        registry_manifest("team-b", "mine", "My-Org", "shared"),
    )
    .expect("b");
    let dir_arg = dir.to_string_lossy().into_owned();
    for command in ["plan", "apply"] {
        let output = run(None, &[command, "-f", &dir_arg]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{command}: {}",
            stdout(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        for file in [&first, &second] {
            assert!(
                stderr.contains(&file.display().to_string()),
                "{command} names {}: {stderr}",
                file.display()
            );
        }
        assert!(
            stderr.contains("one GitLab object has one owner"),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleaned up");
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_outside_the_access_policy_are_not_permitted_and_never_sent() {
    let sim = simulator().await;
    let dir = temp_dir("access-policy");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("dir");
    std::fs::write(
        manifests.join("allowed.yaml"),
        registry_manifest("team-a", "cache-a", "my-org", "cache-a"),
    )
    .expect("allowed");
    let denied = manifests.join("denied.yaml");
    std::fs::write(
        &denied,
        registry_manifest("team-b", "cache-b", "my-org", "cache-b"),
    )
    .expect("denied");
    let policy = dir.join("access.yaml");
    std::fs::write(
        &policy,
        "rules:\n  - namespaces: [team-a]\n    groups: [my-org]\n",
    )
    .expect("policy");
    let (manifests_arg, policy_arg) = (
        manifests.to_string_lossy().into_owned(),
        policy.to_string_lossy().into_owned(),
    );
    let output = tokio::task::block_in_place(|| {
        run(
            Some(&sim),
            &[
                "apply",
                "-f",
                &manifests_arg,
                "--access-policy",
                &policy_arg,
                "-o",
                "json",
            ],
        )
    });
    assert_eq!(output.status.code(), Some(1), "one object is not Ready");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    let objects = report["objects"].as_array().expect("objects");
    let by_name = |name: &str| {
        objects
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
    };
    assert_eq!(by_name("cache-a")["ready"], true, "{report}");
    let refused = by_name("cache-b");
    assert_eq!(refused["reason"], "NotPermitted");
    let message = refused["message"].as_str().expect("message");
    assert!(
        message.contains("namespace team-b") && message.contains(&policy_arg),
        "{message}"
    );
    let names: Vec<String> = sim
        .snapshot()
        .registries
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert!(
        names.contains(&"cache-a".to_string()) && !names.contains(&"cache-b".to_string()),
        "{names:?}"
    );

    // Alone, the refused manifest sends no request at all.
    sim.reset_request_counts();
    let denied_arg = denied.to_string_lossy().into_owned();
    let output = tokio::task::block_in_place(|| {
        run(
            Some(&sim),
            &["plan", "-f", &denied_arg, "--access-policy", &policy_arg],
        )
    });
    assert!(
        stdout(&output).contains("NotPermitted"),
        "{}",
        stdout(&output)
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "a refused object is an error of the plan"
    );
    assert!(
        sim.request_counts().is_empty(),
        "{:?}",
        sim.request_counts()
    );
    std::fs::remove_dir_all(&dir).expect("cleaned up");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_cleanup_expanding_to_a_refused_project_is_not_permitted() {
    let sim = simulator().await;
    let dir = temp_dir("group-expansion");
    std::fs::create_dir_all(&dir).expect("dir");
    let manifest = dir.join("cleanup.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {name: group, namespace: platform}\nspec:\n  schedule: '0 3 * * *'\n  dryRun: true\n  target: {containerRepositories: {group: my-org}}\n  rules: {nameRegexDelete: '.*'}\n",
    )
    .expect("manifest");
    let policy = dir.join("access.yaml");
    std::fs::write(
        &policy,
        "rules: [{namespaces: [platform], groups: [my-org], projects: ['my-org/platform/**']}]\n",
    )
    .expect("policy");
    let (manifest_arg, policy_arg) = (
        manifest.to_string_lossy().into_owned(),
        policy.to_string_lossy().into_owned(),
    );
    let output = tokio::task::block_in_place(|| {
        run(
            Some(&sim),
            &[
                "plan",
                "-f",
                &manifest_arg,
                "--access-policy",
                &policy_arg,
                "-o",
                "json",
            ],
        )
    });
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    let object = &report["objects"][0];
    assert_eq!(object["reason"], "NotPermitted", "{report}");
    assert!(
        object["message"]
            .as_str()
            .is_some_and(|m| m.contains("project my-org/a")),
        "{object}"
    );
    assert_eq!(output.status.code(), Some(1));
    std::fs::remove_dir_all(&dir).expect("cleaned up");
}
