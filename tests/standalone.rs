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

fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("manifest");
    assert!(text.contains(from), "{from} in {}", path.display());
    std::fs::write(path, text.replace(from, to)).expect("write");
}

fn upstreams_named<'a>(
    snapshot: &'a gitlab_registry_operator::sim::Snapshot,
    name: &str,
) -> Vec<&'a gitlab_registry_operator::sim::state::Upstream> {
    snapshot
        .upstreams
        .iter()
        .filter(|upstream| upstream.name == name)
        .collect()
}

/// Standalone keeps no state: an upstream whose url changed in its manifest is found by its
/// name (unique in the group, claimed by no other manifest) and its url updated, not
/// created a second time; its credentials survive the url change (sent after it).
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_url_updates_the_upstream_found_by_its_unique_name() {
    let sim = simulator().await;
    let dir = registry_examples(&temp_dir("url-change"));
    let dir_arg = dir.to_string_lossy().into_owned();
    let output = tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let before = sim.snapshot();
    let docker_hub = upstreams_named(&before, "Docker Hub")[0].clone();
    assert!(
        docker_hub.password.is_some(),
        "the first apply sent credentials"
    );

    replace_in(
        &dir.join("upstream-quay.yaml"),
        "url: https://quay.io",
        "url: https://quay.example.org",
    );
    replace_in(
        &dir.join("upstream-dockerhub.yaml"),
        "url: https://registry-1.docker.io",
        "url: https://mirror.example.org",
    );
    sim.reset_request_counts();
    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg, "-o", "json"]));
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("json");
    for name in ["quay", "dockerhub"] {
        let object = report["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .find(|o| o["kind"] == "Upstream" && o["name"] == name)
            .expect("the upstream's report");
        let reasons: Vec<&str> = object["actions"]
            .as_array()
            .expect("actions")
            .iter()
            .filter_map(|a| a["reason"].as_str())
            .collect();
        assert!(reasons.contains(&"Adopted"), "{name}: {object:#}");
        assert!(reasons.contains(&"Updated"), "{name}: {object:#}");
        assert!(!reasons.contains(&"Created"), "{name}: {object:#}");
    }
    assert!(
        sim.request_counts()
            .keys()
            .all(|route| route.starts_with("GET "))
    );

    let output = tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let after = sim.snapshot();
    assert_eq!(
        after.upstreams.len(),
        before.upstreams.len(),
        "no duplicate"
    );
    let quay = upstreams_named(&after, "Quay");
    assert_eq!(quay.len(), 1);
    assert_eq!(quay[0].url, "https://quay.example.org");
    let moved = upstreams_named(&after, "Docker Hub");
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].id, docker_hub.id);
    assert_eq!(moved[0].url, "https://mirror.example.org");
    assert_eq!(moved[0].username.as_deref(), Some("my-dockerhub-user"));
    assert!(
        moved[0].password.is_some(),
        "credentials survived the url change"
    );
    let output = tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));

    // Another upstream of the same name: which one moved cannot be told, so nothing is
    // created and the condition names both.
    sim.seed(
        &Seed::parse(
            "upstreams: [{id: 990, group: my-org, name: Quay, url: 'https://quay-mirror.example.com'}]\n",
        )
        .expect("seed"),
    )
    .expect("seeded");
    replace_in(
        &dir.join("upstream-quay.yaml"),
        "url: https://quay.example.org",
        "url: https://quay.example.net",
    );
    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg, "-o", "json"]));
    assert_ne!(output.status.code(), Some(0), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("json");
    let object = report["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .find(|o| o["kind"] == "Upstream" && o["name"] == "quay")
        .expect("quay's report");
    assert_eq!(object["ready"], false);
    assert_eq!(object["reason"], "AmbiguousUpstream", "{object:#}");
    let message = object["message"].as_str().expect("message");
    assert!(
        message.contains(&format!("{} (https://quay.example.org)", quay[0].id)),
        "{message}"
    );
    assert!(
        message.contains("990 (https://quay-mirror.example.com)"),
        "{message}"
    );
    let last = sim.snapshot();
    assert_eq!(upstreams_named(&last, "Quay").len(), 2, "nothing created");
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

#[tokio::test(flavor = "multi_thread")]
async fn plan_prints_pending_approvals_and_apply_approve_deletes_exactly_that_plan() {
    let sim = simulator().await;
    let dir = temp_dir("approve");
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("policy.yaml"),
        "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {name: at-most-a-tenth}\nspec:\n  target: {containerRepositories: {project: my-org/app, pathRegex: my-org/app}}\n  rules: {nameRegexDelete: '.*', keepN: 1}\n  safety: {keepInUse: false}\n  limits: {maxDeletionPercent: 10}\n",
    )
    .expect("manifest");
    let dir_arg = dir.to_string_lossy().into_owned();
    let tags = |sim: &SimHandle| -> Vec<String> {
        sim.snapshot()
            .repositories
            .into_iter()
            .find(|repository| repository.path == "my-org/app")
            .map(|repository| repository.tags.into_keys().collect())
            .unwrap_or_default()
    };
    let before = tags(&sim);

    let plan = run(Some(&sim), &["plan", "-f", &dir_arg, "-o", "json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&plan.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&plan)));
    let policy = report["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .find(|object| object["kind"] == "CleanupPolicy")
        .expect("the policy");
    let pending = &policy["pendingApproval"][0];
    assert_eq!(pending["repository"], "my-org/app", "{policy}");
    assert_eq!(policy["reason"], "NeedsApproval", "{policy}");
    let fingerprint = pending["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    let table = stdout(&run(Some(&sim), &["plan", "-f", &dir_arg]));
    assert!(
        table.contains("needs approval: my-org/app would lose")
            && table.contains(&format!("--approve {fingerprint}")),
        "{table}"
    );

    // Without the approval (or with another one) apply deletes nothing and is not Ready.
    for extra in [&[][..], &["--approve", "0000000000000000"][..]] {
        let mut args = vec!["apply", "-f", &dir_arg];
        args.extend_from_slice(extra);
        let refused = run(Some(&sim), &args);
        assert_ne!(refused.status.code(), Some(0), "{}", stdout(&refused));
        assert_eq!(tags(&sim), before);
    }
    assert_eq!(
        sim.request_count(
            "DELETE",
            "/projects/:id/registry/repositories/:repository_id/tags/:tag_name"
        ),
        0
    );

    let approved = run(
        Some(&sim),
        &[
            "apply",
            "-f",
            &dir_arg,
            "--approve",
            &fingerprint,
            "-o",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&approved.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", stdout(&approved)));
    assert_eq!(approved.status.code(), Some(0), "{report}");
    let deleted = pending["wouldDelete"].as_u64().expect("count") as usize;
    assert_eq!(tags(&sim).len(), before.len() - deleted, "{report}");
    let _ = std::fs::remove_dir_all(dir);
}
