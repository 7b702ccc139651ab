//! `apply`, `plan` and `export` through the real binary, against the simulator over loopback
//! (and, for the README's first command, against the embedded default).

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
    run_with_env(sim, args, &[])
}

fn run_with_env(sim: Option<&SimHandle>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .envs(env.iter().copied())
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
    let header = text.lines().next().expect("table header");
    let ready_column = header.find("READY").expect("READY column");
    assert!(header.starts_with("OBJECT") && header.contains("  ACTION  "));
    for line in text.lines().skip(1).take_while(|line| !line.is_empty()) {
        assert_eq!(
            line.get(ready_column..ready_column + 4),
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
    // Not found in GitLab: READY is only for what exists, the action says why nothing was done.
    assert_eq!(object["ready"], serde_json::Value::Null, "{object:#}");
    assert_eq!(object["action"], "blocked: AmbiguousUpstream", "{object:#}");
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
    for command in ["run", "crds", "apply", "plan", "export", "sim"] {
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
    let export_help = stdout(&run(None, &["export", "--help"]));
    for flag in ["--group", "--namespace", "--output-dir", "--gitlab-url"] {
        assert!(
            export_help.contains(flag),
            "{flag} in export --help: {export_help}"
        );
    }
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

// ---- plan's ACTION column -------------------------------------------------------------------

fn json_objects(output: &Output) -> Vec<serde_json::Value> {
    let report: serde_json::Value = serde_json::from_str(&stdout(output))
        .unwrap_or_else(|error| panic!("json output ({error}): {}", stdout(output)));
    report["objects"].as_array().cloned().expect("objects")
}

fn object<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} in {objects:#?}"))
}

/// What plan would create has no READY (it does not exist); what it would update is not Ready
/// yet; apply reports what it did, and what it could not complete as blocked.
#[tokio::test(flavor = "multi_thread")]
async fn plan_and_apply_say_what_happens_to_each_object() {
    let sim = simulator().await;
    let dir = registry_examples(&temp_dir("actions"));
    let dir_arg = dir.to_string_lossy().into_owned();

    let output = tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let table = stdout(&output);
    let header = table.lines().next().expect("header");
    let (action_column, ready_column) = (
        header.find("ACTION").expect("ACTION"),
        header.find("READY").expect("READY"),
    );
    let row = |object: &str| -> (String, String) {
        let line = table
            .lines()
            .find(|l| l.starts_with(object))
            .unwrap_or_else(|| panic!("{object}: {table}"));
        (
            line[action_column..ready_column].trim().to_owned(),
            line[ready_column..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    assert_eq!(
        row("VirtualRegistry/default/docker-cache"),
        ("create".into(), "-".into()),
        "{table}"
    );
    assert_eq!(
        row("Upstream/default/quay"),
        ("create".into(), "-".into()),
        "{table}"
    );
    assert_eq!(
        row("Upstream/default/dockerhub"),
        ("update".into(), "False".into()),
        "{table}"
    );
    assert!(!table.contains("in line with the spec"), "{table}");

    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg, "-o", "json"]));
    let objects = json_objects(&output);
    let registry = object(&objects, "VirtualRegistry", "docker-cache");
    assert_eq!(registry["action"], "create");
    assert_eq!(registry["ready"], serde_json::Value::Null);
    assert_eq!(registry["reason"], "NotCreated");
    let dockerhub = object(&objects, "Upstream", "dockerhub");
    assert_eq!(dockerhub["action"], "update");
    assert_eq!(dockerhub["ready"], false);
    assert_eq!(dockerhub["reason"], "OutOfSync");
    assert!(sim.write_count() == 0, "plan wrote");

    // An Upstream no registry references cannot be created: apply says it is blocked.
    std::fs::write(
        dir.join("upstream-orphan.yaml"),
        "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: orphan}\nspec: {group: my-org, url: 'https://ghcr.io'}\n",
    )
    .expect("write");
    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg, "-o", "json"]));
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let objects = json_objects(&output);
    let orphan = object(&objects, "Upstream", "orphan");
    assert_eq!(orphan["action"], "blocked: WaitingForRegistry");
    assert_eq!(orphan["ready"], serde_json::Value::Null);
    for (kind, name, action) in [
        ("VirtualRegistry", "docker-cache", "create"),
        ("Upstream", "quay", "create"),
        ("Upstream", "dockerhub", "update"),
    ] {
        let done = object(&objects, kind, name);
        assert_eq!(done["action"], action, "{done:#}");
        assert_eq!(done["ready"], true, "{done:#}");
    }

    std::fs::remove_file(dir.join("upstream-orphan.yaml")).expect("remove");
    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg, "-o", "json"]));
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    for object in json_objects(&output) {
        assert_eq!(object["action"], "no change", "{object:#}");
        assert_eq!(object["ready"], true, "{object:#}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

// ---- export ---------------------------------------------------------------------------------

/// The documents of an export, parsed, by kind.
fn exported_documents(yaml: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(yaml)
        .expect("export is valid YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn count_kind(documents: &[serde_json::Value], kind: &str) -> usize {
    documents.iter().filter(|d| d["kind"] == kind).count()
}

/// RFC 1123 label, as Kubernetes checks names.
fn is_dns_label(name: &str) -> bool {
    let label = regex::Regex::new("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("regex");
    name.len() <= 63 && label.is_match(name)
}

/// Requests other than reads and connection tests (which change nothing in GitLab), as
/// `GET /-/sim/requests` reports them.
async fn sim_writes(sim: &SimHandle) -> Vec<(String, u64)> {
    let counts: std::collections::BTreeMap<String, u64> =
        reqwest::get(format!("{}/-/sim/requests", sim.base_url()))
            .await
            .expect("requests answer")
            .json()
            .await
            .expect("json");
    counts
        .into_iter()
        .filter(|(route, _)| !route.starts_with("GET ") && !route.ends_with("/test"))
        .collect()
}

/// Exports the group, then checks the round trip: `plan` of the stream and of the directory
/// reports no change with GET requests only, `apply` writes nothing.
async fn assert_round_trip(sim: &SimHandle, group: &str, name: &str) -> Vec<serde_json::Value> {
    let dir = temp_dir(name);
    let dir_arg = dir.to_string_lossy().into_owned();
    let file = std::env::temp_dir().join(format!("gro-export-{name}-{}.yaml", std::process::id()));
    let file_arg = file.to_string_lossy().into_owned();

    let output = tokio::task::block_in_place(|| run(Some(sim), &["export", "--group", group]));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = stdout(&output);
    assert!(yaml.starts_with("# Exported by"), "{yaml}");
    assert!(
        yaml.contains(&sim.base_url()),
        "the header says where from: {yaml}"
    );
    assert!(yaml.contains("gitlab-registry-operator plan -f"), "{yaml}");
    std::fs::write(&file, &yaml).expect("write export");
    let output = tokio::task::block_in_place(|| {
        run(Some(sim), &["export", "--group", group, "-o", &dir_arg])
    });
    assert_eq!(output.status.code(), Some(0));

    sim.reset_request_counts();
    // What GitLab holds; the simulator's clock moves on regardless.
    let state = || {
        let mut state = serde_json::to_value(sim.snapshot()).expect("snapshot");
        state.as_object_mut().expect("object").remove("now");
        state
    };
    let snapshot_before = state();
    for path in [&file_arg, &dir_arg] {
        let output = tokio::task::block_in_place(|| run(Some(sim), &["plan", "-f", path]));
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(0), "plan of the export: {text}");
        assert!(text.contains("No changes"), "{text}");
        for line in text.lines().skip(1).take_while(|line| !line.is_empty()) {
            assert!(line.contains("  no change  "), "{line}\n{text}");
        }
    }
    assert!(
        sim.request_counts()
            .keys()
            .all(|route| route.starts_with("GET ")),
        "{:?}",
        sim.request_counts()
    );
    let output = tokio::task::block_in_place(|| run(Some(sim), &["apply", "-f", &dir_arg]));
    assert_eq!(output.status.code(), Some(0), "apply: {}", stdout(&output));
    let writes = sim_writes(sim).await;
    assert!(writes.is_empty(), "apply of the export wrote: {writes:?}");
    assert_eq!(sim.write_count(), 0, "{:?}", sim.request_counts());
    assert_eq!(state(), snapshot_before, "GitLab changed");
    let files = std::fs::read_dir(&dir).expect("dir").count();
    let documents = exported_documents(&yaml);
    assert_eq!(files, documents.len(), "one file per object");
    for document in &documents {
        let name = document["metadata"]["name"].as_str().expect("name");
        assert!(is_dns_label(name), "{name}");
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(file);
    documents
}

#[tokio::test(flavor = "multi_thread")]
async fn export_of_the_demo_data_round_trips_through_plan_and_apply() {
    let sim = simulator().await;
    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["export", "--group", "my-org/platform"]));
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("only on top-level groups"), "{error}");
    let documents = assert_round_trip(&sim, "my-org", "demo").await;
    assert_eq!(count_kind(&documents, "Upstream"), 1, "{documents:#?}");
    assert_eq!(documents[0]["spec"]["name"], "Docker Hub");

    // After the examples are applied: a registry, credentials, a GitLab-run policy.
    let output = tokio::task::block_in_place(|| {
        run(Some(&sim), &["apply", "-f", &examples().to_string_lossy()])
    });
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let documents = assert_round_trip(&sim, "my-org", "demo-applied").await;
    assert_eq!(count_kind(&documents, "VirtualRegistry"), 1);
    assert_eq!(count_kind(&documents, "Upstream"), 2);
    assert_eq!(count_kind(&documents, "Secret"), 1);
    assert_eq!(count_kind(&documents, "CleanupPolicy"), 1);
    let registry = documents
        .iter()
        .find(|d| d["kind"] == "VirtualRegistry")
        .expect("registry");
    assert_eq!(
        registry["spec"]["upstreams"],
        serde_json::json!([{"name": "docker-hub"}, {"name": "quay"}])
    );
}

/// A group of 5 registries sharing upstreams in different orders, names that collide once
/// made Kubernetes names, credentials, an upstream in no registry, project policies on and
/// off, and another group that must not leak in.
const SEEDED_GROUP: &str = r#"
groups:
  - {id: 10, full_path: acme}
  - {id: 12, full_path: acme/team}
  - {id: 11, full_path: other}
projects:
  - {id: 20, path_with_namespace: acme/web}
  - {id: 21, path_with_namespace: acme/team/svc}
  - {id: 22, path_with_namespace: acme/legacy}
  - {id: 23, path_with_namespace: other/thing}
registries:
  - {id: 600, group: acme, name: Docker Cache, description: "The main cache: Docker Hub, then Quay"}
  - {id: 601, group: acme, name: docker-cache}
  - {id: 602, group: acme, name: "Mirror #1"}
  - {id: 603, group: acme, name: GitHub}
  - {id: 604, group: acme, name: cache.internal, description: empty for now}
  - {id: 610, group: other, name: Docker Cache}
upstreams:
  - {id: 500, group: acme, name: Docker Hub, url: "https://registry-1.docker.io", username: acme-bot, password: s3cret-1, description: "Docker Hub, authenticated", registries: [Docker Cache, docker-cache]}
  - {id: 502, group: acme, name: GHCR, url: "https://ghcr.io", username: gh-user, password: s3cret-2, cache_validity_hours: 0, registries: [GitHub, "Mirror #1"]}
  - {id: 501, group: acme, name: Quay, url: "https://quay.io", cache_validity_hours: 48, registries: [docker-cache, Docker Cache, "Mirror #1"]}
  - {id: 503, group: acme, name: Docker Hub, url: "https://mirror.gcr.io", registries: ["Mirror #1", GitHub]}
  - {id: 504, group: acme, name: Harbor, url: "https://harbor.example.com", username: "robot$acme", password: p4ss, description: "pre-existing, unused"}
  - {id: 505, group: other, name: Elsewhere, url: "https://other.example.com", registries: [Docker Cache]}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn export_of_a_seeded_group_round_trips_and_keeps_gitlab_names_and_order() {
    use gitlab_registry_operator::gitlab::{
        ClientConfig, ContainerExpirationPolicyUpdate, GitLabClient, PathOrId,
    };
    let sim = Simulator::start(
        SimConfig::embedded_demo(),
        Seed::parse(SEEDED_GROUP).expect("seed parses"),
    )
    .await
    .expect("simulator starts");
    let client = GitLabClient::new(ClientConfig::new(
        sim.base_url().parse().expect("url"),
        sim.config().token.clone(),
    ))
    .expect("client");
    for (project, update) in [
        (
            "acme/web",
            ContainerExpirationPolicyUpdate {
                cadence: Some("7d".into()),
                enabled: Some(true),
                keep_n: Some(Some(10)),
                older_than: Some(Some("14d".into())),
                name_regex: Some(".*".into()),
                name_regex_keep: Some("main|release-.*".into()),
            },
        ),
        (
            "acme/team/svc",
            ContainerExpirationPolicyUpdate {
                cadence: Some("1month".into()),
                enabled: Some(true),
                keep_n: Some(None),
                older_than: Some(None),
                name_regex: Some("feature-.*".into()),
                name_regex_keep: None,
            },
        ),
        (
            "acme/legacy",
            ContainerExpirationPolicyUpdate {
                cadence: Some("14d".into()),
                enabled: Some(false),
                ..Default::default()
            },
        ),
        (
            "other/thing",
            ContainerExpirationPolicyUpdate {
                cadence: Some("1d".into()),
                enabled: Some(true),
                name_regex: Some(".*".into()),
                ..Default::default()
            },
        ),
    ] {
        client
            .update_cleanup_policy(&PathOrId::parse(project), &update)
            .await
            .expect("policy set");
    }

    let documents = assert_round_trip(&sim, "acme", "seeded").await;
    assert_eq!(
        count_kind(&documents, "VirtualRegistry"),
        5,
        "{documents:#?}"
    );
    assert_eq!(count_kind(&documents, "Upstream"), 5);
    assert_eq!(count_kind(&documents, "Secret"), 3);
    assert_eq!(count_kind(&documents, "CleanupPolicy"), 2);
    let find = |kind: &str, name: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} in {documents:#?}"))
            .clone()
    };
    let members = |registry: &str| find("VirtualRegistry", registry)["spec"]["upstreams"].clone();
    assert_eq!(
        find("VirtualRegistry", "docker-cache")["spec"]["name"],
        "Docker Cache"
    );
    assert_eq!(
        find("VirtualRegistry", "docker-cache-601")["spec"]["name"],
        "docker-cache"
    );
    assert_eq!(
        find("VirtualRegistry", "mirror-1")["spec"]["name"],
        "Mirror #1"
    );
    assert_eq!(
        members("docker-cache"),
        serde_json::json!([{"name": "docker-hub"}, {"name": "quay"}])
    );
    assert_eq!(
        members("docker-cache-601"),
        serde_json::json!([{"name": "docker-hub"}, {"name": "quay"}])
    );
    assert_eq!(
        members("mirror-1"),
        serde_json::json!([{"name": "ghcr"}, {"name": "quay"}, {"name": "docker-hub-503"}])
    );
    assert_eq!(
        members("github"),
        serde_json::json!([{"name": "ghcr"}, {"name": "docker-hub-503"}])
    );
    assert_eq!(members("cache-internal"), serde_json::json!([]));
    assert_eq!(
        find("Upstream", "docker-hub-503")["spec"]["url"],
        "https://mirror.gcr.io"
    );
    assert_eq!(find("Upstream", "ghcr")["spec"]["cacheValidityHours"], 0);
    let secret = find("Secret", "harbor-credentials");
    assert_eq!(secret["stringData"]["username"], "robot$acme");
    assert_eq!(
        secret["stringData"]["password"],
        gitlab_registry_operator::standalone::export::PLACEHOLDER_PASSWORD
    );
    let web = find("CleanupPolicy", "web");
    assert_eq!(web["spec"]["strategy"], "GitLabPolicy");
    assert_eq!(web["spec"]["cadence"], "7d");
    assert_eq!(web["spec"]["rules"]["nameRegexKeep"], "main|release-.*");
    assert_eq!(
        find("CleanupPolicy", "team-svc")["spec"]["target"]["containerRepositories"]["project"],
        "acme/team/svc"
    );
    let everything = serde_json::to_string(&documents).expect("json");
    for secret in ["s3cret-1", "s3cret-2", "p4ss"] {
        assert!(!everything.contains(secret), "a password was exported");
    }
    for foreign in ["Elsewhere", "other/thing"] {
        assert!(
            !everything.contains(foreign),
            "{foreign} is not in group acme"
        );
    }
}

/// An exported Secret's placeholder is never sent: a plan or apply that would send the
/// credentials (here, asked to resend them) is blocked and writes nothing, until the real
/// password is given.
#[tokio::test(flavor = "multi_thread")]
async fn a_placeholder_password_is_never_sent_to_gitlab() {
    let sim = Simulator::start(
        SimConfig::embedded_demo(),
        Seed::parse(SEEDED_GROUP).expect("seed parses"),
    )
    .await
    .expect("simulator starts");
    let dir = temp_dir("placeholder");
    let dir_arg = dir.to_string_lossy().into_owned();
    let output = tokio::task::block_in_place(|| {
        run(Some(&sim), &["export", "--group", "acme", "-o", &dir_arg])
    });
    assert_eq!(output.status.code(), Some(0));

    sim.reset_request_counts();
    for command in ["plan", "apply"] {
        let output = tokio::task::block_in_place(|| {
            run(
                Some(&sim),
                &[
                    command,
                    "-f",
                    &dir_arg,
                    "--resend-credentials",
                    "-o",
                    "json",
                ],
            )
        });
        assert_eq!(
            output.status.code(),
            Some(1),
            "{command}: {}",
            stdout(&output)
        );
        let objects = json_objects(&output);
        for name in ["docker-hub", "ghcr", "harbor"] {
            let upstream = object(&objects, "Upstream", name);
            assert_eq!(
                upstream["action"], "blocked: PlaceholderPassword",
                "{upstream:#}"
            );
            assert!(
                upstream["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!(
                        "{}_CREDENTIALS_PASSWORD",
                        name.to_uppercase().replace('-', "_")
                    ))),
                "{upstream:#}"
            );
        }
        assert_eq!(object(&objects, "Upstream", "quay")["action"], "no change");
    }
    let writes = sim_writes(&sim).await;
    assert!(writes.is_empty(), "the placeholder was sent: {writes:?}");

    // With the real password from the environment, the credentials go.
    let output = tokio::task::block_in_place(|| {
        run_with_env(
            Some(&sim),
            &["apply", "-f", &dir_arg, "--resend-credentials"],
            &[
                ("DOCKER_HUB_CREDENTIALS_PASSWORD", "s3cret-1"),
                ("GHCR_CREDENTIALS_PASSWORD", "s3cret-2"),
                ("HARBOR_CREDENTIALS_PASSWORD", "p4ss"),
            ],
        )
    });
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert_eq!(
        sim.request_count("PATCH", "/virtual_registries/container/upstreams/:id"),
        3
    );

    // Exporting again into the directory names what an earlier export left there.
    std::fs::write(
        dir.join("upstream-gone.yaml"),
        "# deleted in GitLab since\n",
    )
    .expect("write");
    let output = tokio::task::block_in_place(|| {
        run(Some(&sim), &["export", "--group", "acme", "-o", &dir_arg])
    });
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upstream-gone.yaml is not part of this export"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
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

// ---- The registry an upstream is created through ---------------------------------------------

/// `plan` and `apply` pick the registry to create an upstream through by the operator's rule
/// (the first by name among those listing it first), not by their GitLab ids: `a` gets the
/// lower id here, so a pick by the highest id would take `b`.
#[tokio::test(flavor = "multi_thread")]
async fn apply_creates_an_upstream_through_the_registry_the_operator_would_choose() {
    use gitlab_registry_operator::crd::{Upstream, VirtualRegistry, VirtualRegistryStatus};
    use gitlab_registry_operator::sync::upstream::CreateThrough;

    let sim = simulator().await;
    let dir = temp_dir("create-through");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let registry = |name: &str| {
        format!(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {{name: {name}, namespace: team}}\nspec: {{group: my-org, upstreams: [{{name: ghcr}}]}}\n"
        )
    };
    let upstream = "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: ghcr, namespace: team}\nspec: {group: my-org, url: 'https://ghcr.io'}\n";
    std::fs::write(dir.join("1-a.yaml"), registry("a")).expect("write");
    std::fs::write(dir.join("2-b.yaml"), registry("b")).expect("write");
    std::fs::write(dir.join("3-ghcr.yaml"), upstream).expect("write");
    let dir_arg = dir.to_string_lossy().into_owned();
    let messages = |object: &serde_json::Value| -> Vec<String> {
        object["actions"]
            .as_array()
            .expect("actions")
            .iter()
            .map(|a| a["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    };

    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["plan", "-f", &dir_arg, "-o", "json"]));
    let objects = json_objects(&output);
    let planned = messages(object(&objects, "Upstream", "ghcr"));
    assert!(
        planned
            .iter()
            .any(|m| m == "would create through registry a, which this plan creates"),
        "{planned:?}"
    );

    let output =
        tokio::task::block_in_place(|| run(Some(&sim), &["apply", "-f", &dir_arg, "-o", "json"]));
    let objects = json_objects(&output);
    let id = |name: &str| {
        object(&objects, "VirtualRegistry", name)["gitlabId"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name} created: {objects:#?}"))
    };
    let (a, b) = (id("a"), id("b"));
    assert!(a < b, "a created first: {a} {b}");

    // The operator's choice for the same objects, with the ids apply found.
    let mut registries: Vec<VirtualRegistry> = ["a", "b"]
        .map(|name| serde_saphyr::from_str(&registry(name)).expect("valid"))
        .into();
    for (registry, id) in registries.iter_mut().zip([a, b]) {
        registry.status = Some(VirtualRegistryStatus {
            registry_id: Some(id),
            ..Default::default()
        });
    }
    let upstream: Upstream = serde_saphyr::from_str(upstream).expect("valid");
    let cluster = gitlab_registry_operator::resolve::Objects {
        registries: registries.iter().collect(),
        ..Default::default()
    };
    let operator = gitlab_registry_operator::resolve::upstream::request(
        &upstream,
        None,
        &cluster,
        jiff::Timestamp::UNIX_EPOCH,
    )
    .expect("valid")
    .registry_for_create;
    assert_eq!(operator, Some(CreateThrough::Registry(a)));

    let created = messages(object(&objects, "Upstream", "ghcr"));
    assert!(
        created
            .iter()
            .any(|m| m.starts_with("created upstream")
                && m.ends_with(&format!("through registry {a}"))),
        "{created:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
