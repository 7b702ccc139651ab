//! End to end against a real cluster (from `KUBECONFIG`): installs `crds/`, runs the
//! controllers in this process against a GitLab simulator, applies `examples/` into a fresh
//! namespace, waits for `Ready`, edits, deletes, and checks GitLab's state through the
//! simulator. Skipped, with the reason printed, when no cluster is reachable (as in CI here).
//! One variant installs the chart's rendered RBAC into a fresh namespace and runs the
//! controllers, with leader election, as the chart's ServiceAccount (a TokenRequest token).

#[path = "support/chart.rs"]
mod chart;

use std::time::Duration;

use futures::FutureExt as _;
use gitlab_registry_operator::controller::context::{DefaultConnection, OperatorConfig};
use gitlab_registry_operator::controller::runtime::{
    LEASE_NAME, RuntimeOptions, run_until, run_with_client,
};
use gitlab_registry_operator::crd::{self, Upstream, VirtualRegistry};
use gitlab_registry_operator::sim::{Seed, SimConfig, SimHandle, Simulator};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// A client for the cluster in `KUBECONFIG`, or why there is none.
async fn cluster() -> Result<Client, String> {
    if std::env::var_os("KUBECONFIG").is_none() {
        return Err("KUBECONFIG is not set".into());
    }
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no usable kubeconfig: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(error)) => Err(format!("the cluster does not answer: {error}")),
        Err(_) => Err("the cluster did not answer within 5 s".into()),
    }
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..120 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out waiting for {what}");
}

fn is_ready<K: serde::Serialize>(object: &K) -> bool {
    let value = serde_json::to_value(object).unwrap_or_default();
    value["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn examples_become_ready_then_follow_edits_and_deletion() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(reason) => {
            println!("SKIPPED e2e: {reason}");
            return;
        }
    };

    install_crds(&client).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let sim = Simulator::start(SimConfig::embedded_demo(), Seed::demo())
        .await
        .expect("simulator");
    let namespace = format!("gro-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    create_namespace(&namespaces, &namespace).await;

    let config = operator_config(&sim);
    let options = RuntimeOptions {
        metrics_addr: "127.0.0.1:0".parse().expect("addr"),
        leader_election: false,
        leader_election_namespace: None,
        leader_election_identity: None,
        watch_namespace: Some(namespace.clone()),
        max_concurrent_reconciles: 16,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run_until(config, options, async move {
        let _ = stopped.await;
    }));

    // Apply every example into the namespace.
    let text: String = [
        "secret-dockerhub-credentials.yaml",
        "upstream-dockerhub.yaml",
        "upstream-quay.yaml",
        "virtualregistry.yaml",
    ]
    .iter()
    .map(|file| {
        std::fs::read_to_string(format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR")))
            .expect("example")
    })
    .collect::<Vec<_>>()
    .join("\n---\n");
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("yaml");
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    for document in documents.into_iter().filter(|d| !d.is_null()) {
        let object: kube::api::DynamicObject = serde_json::from_value(document).expect("object");
        let gvk = kube::api::GroupVersionKind::try_from(object.types.as_ref().expect("types"))
            .expect("gvk");
        let (resource, _) = discovery.resolve_gvk(&gvk).expect("known kind");
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &resource);
        api.patch(
            &object.name_any(),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&object),
        )
        .await
        .expect("applied");
    }

    let registries: Api<VirtualRegistry> = Api::namespaced(client.clone(), &namespace);
    let upstreams: Api<Upstream> = Api::namespaced(client.clone(), &namespace);
    wait_for("docker-cache Ready", || async {
        registries
            .get("docker-cache")
            .await
            .is_ok_and(|r| is_ready(&r))
    })
    .await;
    wait_for("upstreams Ready", || async {
        upstreams.get("dockerhub").await.is_ok_and(|u| is_ready(&u))
            && upstreams.get("quay").await.is_ok_and(|u| is_ready(&u))
    })
    .await;
    let registry = registries.get("docker-cache").await.expect("registry");
    let status = registry.status.expect("status");
    assert_eq!(
        status
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        ["dockerhub", "quay"]
    );

    // Edit: reverse the order; GitLab follows.
    registries
        .patch(
            "docker-cache",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"upstreams": [{"name": "quay"}, {"name": "dockerhub"}]}}),
            ),
        )
        .await
        .expect("edited");
    wait_for("reordered in GitLab", || async {
        registries.get("docker-cache").await.is_ok_and(|r| {
            r.status.is_some_and(|s| {
                s.upstreams
                    .first()
                    .is_some_and(|u| u.name == "quay" && u.position == 1)
            })
        })
    })
    .await;

    // Delete the registry: GitLab's registry goes, the declared upstreams survive.
    registries
        .delete("docker-cache", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for("registry gone", || async {
        registries
            .get_opt("docker-cache")
            .await
            .is_ok_and(|r| r.is_none())
    })
    .await;
    let state = serde_json::to_value(sim.snapshot()).expect("state");
    assert!(
        state["registries"].as_array().is_none_or(|r| r.is_empty()),
        "{state:#}"
    );
    assert!(
        state.to_string().contains("https://quay.io"),
        "quay survived: {state:#}"
    );

    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), operator).await;
}

/// Two operator instances with leader election: only the Lease holder reconciles; when it
/// stops, the other takes over and the objects stay in line.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(reason) => {
            println!("SKIPPED e2e leader election: {reason}");
            return;
        }
    };
    install_crds(&client).await;
    let sim = Simulator::start(SimConfig::embedded_demo(), Seed::demo())
        .await
        .expect("simulator");
    let namespace = format!("gro-e2e-lease-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    create_namespace(&namespaces, &namespace).await;
    let start = |identity: &str| {
        let config = operator_config(&sim);
        let options = RuntimeOptions {
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            leader_election: true,
            leader_election_namespace: Some(namespace.clone()),
            leader_election_identity: Some(identity.to_string()),
            watch_namespace: Some(namespace.clone()),
            max_concurrent_reconciles: 16,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_until(config, options, async move {
            let _ = stopped.await;
        }));
        (stop, task)
    };
    let (stop_first, first) = start("first");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (stop_second, second) = start("second");

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &namespace);
    let holder = || async {
        leases
            .get_opt("gitlab-registry-operator")
            .await
            .ok()
            .flatten()
            .and_then(|lease| lease.spec.and_then(|spec| spec.holder_identity))
    };
    wait_for("a lease holder", || async { holder().await.is_some() }).await;
    assert_eq!(holder().await.as_deref(), Some("first"));

    let registries: Api<VirtualRegistry> = Api::namespaced(client.clone(), &namespace);
    let registry: VirtualRegistry = serde_json::from_value(json!({
        "apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry",
        "metadata": {"name": "lease-cache"}, "spec": {"group": "my-org"}
    }))
    .expect("registry");
    registries
        .create(&PostParams::default(), &registry)
        .await
        .expect("created");
    wait_for("lease-cache Ready under the first leader", || async {
        registries
            .get("lease-cache")
            .await
            .is_ok_and(|r| is_ready(&r))
    })
    .await;
    assert!(!second.is_finished(), "the standby keeps waiting");

    // The leader goes; the standby takes the lease and keeps reconciling.
    let _ = stop_first.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), first).await;
    wait_for("the standby to take the lease", || async {
        holder().await.as_deref() == Some("second")
    })
    .await;
    registries
        .patch(
            "lease-cache",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"description": "after failover"}})),
        )
        .await
        .expect("edited");
    wait_for("the edit reaches GitLab through the new leader", || async {
        serde_json::to_value(sim.snapshot())
            .is_ok_and(|state| state.to_string().contains("after failover"))
    })
    .await;

    delete_and_wait(&registries, "lease-cache").await;
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    let _ = stop_second.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), second).await;
}

/// Deletes `name` and waits until it is gone (its finalizer run).
async fn delete_and_wait<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api.delete(name, &DeleteParams::default()).await;
    wait_for(&format!("{name} gone"), || async {
        api.get_opt(name).await.is_ok_and(|object| object.is_none())
    })
    .await;
}

/// The operator's configuration against the simulator `sim`, resyncing every 30 s.
fn operator_config(sim: &SimHandle) -> OperatorConfig {
    OperatorConfig {
        default_gitlab: Some(DefaultConnection {
            url: sim.base_url().parse().expect("url"),
            token: sim.config().token.clone(),
        }),
        resync: Duration::from_secs(30),
        ..OperatorConfig::default()
    }
}

async fn create_namespace(namespaces: &Api<Namespace>, name: &str) {
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace"),
        )
        .await
        .expect("namespace created");
}

/// Applies the CRDs (cluster-wide; installed by an administrator, not by the chart's RBAC)
/// and waits until the apiserver serves them.
async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, definition) in crd::all() {
        crds.patch(
            &definition.name_any(),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&definition),
        )
        .await
        .expect("CRD applied");
    }
    for (_, definition) in crd::all() {
        let name = definition.name_any();
        wait_for(&format!("CRD {name} Established"), || async {
            crds.get(&name).await.is_ok_and(|crd| {
                crd.status
                    .and_then(|status| status.conditions)
                    .is_some_and(|conditions| {
                        conditions
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            })
        })
        .await;
    }
}

/// Server-side applies `objects` (namespaced ones into `namespace`) as the e2e field manager.
async fn apply_all(client: &Client, namespace: &str, objects: &[&serde_json::Value]) {
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    for object in objects {
        let object: kube::api::DynamicObject =
            serde_json::from_value((*object).clone()).expect("object");
        let gvk = kube::api::GroupVersionKind::try_from(object.types.as_ref().expect("types"))
            .expect("gvk");
        let (resource, capabilities) = discovery.resolve_gvk(&gvk).expect("known kind");
        let api: Api<kube::api::DynamicObject> =
            if capabilities.scope == kube::discovery::Scope::Namespaced {
                Api::namespaced_with(client.clone(), namespace, &resource)
            } else {
                Api::all_with(client.clone(), &resource)
            };
        api.patch(
            &object.name_any(),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("{} {} applied: {e}", gvk.kind, object.name_any()));
    }
}

/// The chart's RBAC for `watchNamespace` with leader election, installed into a fresh
/// namespace (also the release namespace); the controllers run as its ServiceAccount with a
/// token from the TokenRequest API, take the Lease, and reconcile a registry and a
/// CleanupPolicy with keepInUse.
#[tokio::test(flavor = "multi_thread")]
async fn controllers_with_leader_election_work_under_the_charts_own_rbac() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(reason) => {
            println!("SKIPPED e2e chart RBAC: {reason}");
            return;
        }
    };
    let helm = match chart::helm() {
        Ok(helm) => helm,
        Err(reason) => {
            println!("SKIPPED e2e chart RBAC: {reason}");
            return;
        }
    };
    install_crds(&client).await;
    let namespace = format!("gro-e2e-rbac-{}", std::process::id());
    let release = format!("gro-rbac-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    create_namespace(&namespaces, &namespace).await;

    let rendered = chart::render(
        &helm,
        &release,
        &namespace,
        &[
            "--set",
            &format!("watchNamespace={namespace}"),
            "--set",
            "leaderElection.enabled=true",
        ],
    );
    let rbac = chart::rbac_objects(&rendered);
    assert!(
        rbac.iter().all(|o| o["kind"] != "ClusterRole"),
        "watchNamespace: no cluster-wide rights"
    );
    apply_all(&client, &namespace, &rbac).await;
    let account = rbac
        .iter()
        .find(|o| o["kind"] == "ServiceAccount")
        .and_then(|o| o["metadata"]["name"].as_str())
        .expect("the chart's ServiceAccount")
        .to_owned();
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), &namespace);
    let token_request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .expect("token request");
    let token = accounts
        .create_token_request(&account, &PostParams::default(), &token_request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token status")
        .token;
    let mut identity = kube::Config::infer().await.expect("kubeconfig");
    identity.auth_info = kube::config::AuthInfo {
        token: Some(secrecy::SecretString::from(token)),
        ..Default::default()
    };
    let operator_client = Client::try_from(identity).expect("client as the ServiceAccount");

    let sim = Simulator::start(SimConfig::embedded_demo(), Seed::demo())
        .await
        .expect("simulator");
    let config = operator_config(&sim);
    let identity_name = format!("rbac-e2e-{}", std::process::id());
    let options = RuntimeOptions {
        metrics_addr: "127.0.0.1:0".parse().expect("addr"),
        leader_election: true,
        leader_election_namespace: Some(namespace.clone()),
        leader_election_identity: Some(identity_name.clone()),
        watch_namespace: Some(namespace.clone()),
        max_concurrent_reconciles: 16,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run_with_client(
        operator_client,
        config,
        options,
        async move {
            let _ = stopped.await;
        },
    ));

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &namespace);
    wait_for("the ServiceAccount to hold the Lease", || async {
        leases
            .get_opt(LEASE_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|lease| lease.spec.and_then(|spec| spec.holder_identity))
            == Some(identity_name.clone())
    })
    .await;

    let registry = json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry",
                          "metadata": {"name": "rbac-cache"}, "spec": {"group": "my-org"}});
    let policy = json!({"apiVersion": "gitlabregistry.io/v1alpha1", "kind": "CleanupPolicy",
        "metadata": {"name": "rbac-cleanup", "annotations": {"gitlabregistry.io/run-requested-at": "e2e"}},
        "spec": {"schedule": "0 3 * * *", "dryRun": true,
                 "target": {"containerRepositories": {"project": "my-org/app"}},
                 "rules": {"nameRegexDelete": ".*", "keepN": 3},
                 "safety": {"keepInUse": true}}});
    apply_all(&client, &namespace, &[&registry, &policy]).await;
    let registries: Api<VirtualRegistry> = Api::namespaced(client.clone(), &namespace);
    wait_for("rbac-cache Ready under the chart's RBAC", || async {
        registries
            .get("rbac-cache")
            .await
            .is_ok_and(|r| is_ready(&r))
    })
    .await;
    let policies: Api<crd::CleanupPolicy> = Api::namespaced(client.clone(), &namespace);
    wait_for("the requested cleanup run", || async {
        policies.get("rbac-cleanup").await.is_ok_and(|p| {
            p.status
                .is_some_and(|s| s.last_handled_run_request.as_deref() == Some("e2e"))
        })
    })
    .await;
    assert!(!operator.is_finished(), "the operator keeps running");

    delete_and_wait(&registries, "rbac-cache").await;
    delete_and_wait(&policies, "rbac-cleanup").await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), operator).await;
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
}

fn ready_reason(registry: &VirtualRegistry) -> Option<(String, String, String)> {
    let status = registry.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((
        ready.status.clone(),
        ready.reason.clone(),
        ready.message.clone(),
    ))
}

/// Two namespaces under one access policy, each watched by an operator of its own
/// (`--watch-namespace`): the permitted namespace gets its registry, and of two registries
/// there claiming one GitLab registry the younger waits in `Conflict` until the owner goes;
/// the other namespace is `NotPermitted` until the policy file lets it in.
#[tokio::test(flavor = "multi_thread")]
async fn an_access_policy_and_one_owner_per_gitlab_registry_on_a_shared_cluster() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(reason) => {
            println!("SKIPPED e2e tenancy: {reason}");
            return;
        }
    };
    install_crds(&client).await;
    let run = std::process::id();
    let group = format!("gro-tenancy-{run}");
    let (team_a, team_b) = (
        format!("gro-tenancy-a-{run}"),
        format!("gro-tenancy-b-{run}"),
    );
    let sim = Simulator::start(
        SimConfig::with_token("e2e-tenancy-token"),
        Seed::parse(&format!("groups:\n  - {{id: 100, full_path: {group}}}\n")).expect("seed"),
    )
    .await
    .expect("simulator");
    let policy_dir = std::env::temp_dir().join(format!("gro-e2e-tenancy-{run}"));
    std::fs::create_dir_all(&policy_dir).expect("policy dir");
    let policy_path = policy_dir.join("access.yaml");
    std::fs::write(
        &policy_path,
        format!("rules: [{{namespaces: [{team_a}], groups: [{group}]}}]\n"),
    )
    .expect("policy");
    let policy = std::sync::Arc::new(
        gitlab_registry_operator::controller::tenancy::AccessPolicyFile::load(&policy_path)
            .expect("policy loads"),
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for namespace in [&team_a, &team_b] {
        create_namespace(&namespaces, namespace).await;
    }
    let start = |namespace: &str| {
        let config = OperatorConfig {
            access_policy: Some(policy.clone()),
            ..operator_config(&sim)
        };
        let options = RuntimeOptions {
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            leader_election: false,
            leader_election_namespace: None,
            leader_election_identity: None,
            watch_namespace: Some(namespace.to_owned()),
            max_concurrent_reconciles: 16,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_until(config, options, async move {
            let _ = stopped.await;
        }));
        (stop, task)
    };
    let operators = [start(&team_a), start(&team_b)];
    let registry = |name: &str, gitlab_name: &str| -> VirtualRegistry {
        serde_json::from_value(json!({
            "apiVersion": "gitlabregistry.io/v1alpha1", "kind": "VirtualRegistry",
            "metadata": {"name": name}, "spec": {"group": group, "name": gitlab_name}
        }))
        .expect("registry")
    };
    let in_a: Api<VirtualRegistry> = Api::namespaced(client.clone(), &team_a);
    let in_b: Api<VirtualRegistry> = Api::namespaced(client.clone(), &team_b);
    let reason_of = |api: &Api<VirtualRegistry>, name: &'static str| {
        let api = api.clone();
        async move { api.get(name).await.ok().and_then(|r| ready_reason(&r)) }
    };

    // Whatever happens in the checks, the namespaces, the operators and the policy file go.
    let checks = std::panic::AssertUnwindSafe(async {
        in_a.create(&PostParams::default(), &registry("first", "shared"))
            .await
            .expect("created");
        wait_for("first Ready", || async {
            reason_of(&in_a, "first")
                .await
                .is_some_and(|(s, _, _)| s == "True")
        })
        .await;
        in_a.create(&PostParams::default(), &registry("second", "shared"))
            .await
            .expect("created");
        wait_for("second in Conflict naming first", || async {
            reason_of(&in_a, "second").await.is_some_and(|(s, r, m)| {
                s == "False" && r == "Conflict" && m.contains(&format!("{team_a}/first"))
            })
        })
        .await;
        in_b.create(&PostParams::default(), &registry("other", "team-b-cache"))
            .await
            .expect("created");
        wait_for("other NotPermitted", || async {
            reason_of(&in_b, "other")
                .await
                .is_some_and(|(s, r, m)| s == "False" && r == "NotPermitted" && m.contains(&team_b))
        })
        .await;
        assert_eq!(sim.snapshot().registries.len(), 1, "one GitLab registry");

        // The owner goes (deleting its GitLab registry): the other takes over and recreates it.
        in_a.delete("first", &DeleteParams::default())
            .await
            .expect("deleted");
        wait_for("second takes over", || async {
            reason_of(&in_a, "second")
                .await
                .is_some_and(|(s, _, _)| s == "True")
        })
        .await;
        assert_eq!(sim.snapshot().registries.len(), 1);

        // The policy file changes: team-b is let in without a restart.
        std::fs::write(
            &policy_path,
            format!("rules: [{{namespaces: [{team_a}, {team_b}], groups: [{group}]}}]\n"),
        )
        .expect("policy");
        wait_for("other Ready", || async {
            reason_of(&in_b, "other")
                .await
                .is_some_and(|(s, _, _)| s == "True")
        })
        .await;
        assert_eq!(sim.snapshot().registries.len(), 2);

        for (api, name) in [(&in_b, "other"), (&in_a, "second")] {
            let _ = api.delete(name, &DeleteParams::default()).await;
            wait_for("deleted", || async {
                api.get_opt(name).await.is_ok_and(|r| r.is_none())
            })
            .await;
        }
    })
    .catch_unwind()
    .await;

    // A failed check may leave objects behind: their finalizers must not hold the namespaces.
    for api in [&in_a, &in_b] {
        for leftover in api
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let _ = api
                .patch(
                    &leftover.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
    for namespace in [&team_a, &team_b] {
        let _ = namespaces.delete(namespace, &DeleteParams::default()).await;
    }
    for (stop, task) in operators {
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    let _ = std::fs::remove_dir_all(&policy_dir);
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
}
