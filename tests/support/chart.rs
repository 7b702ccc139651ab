//! The Helm chart as the tests render it: the helm binary (`$HELM`, else `.ci/bin/helm` from
//! `bash .ci/install-helm`, else `helm` on `PATH`) and `helm template`'s objects.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The helm binary, or why there is none.
pub fn helm() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("HELM").filter(|path| !path.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/bin/helm");
    if installed.is_file() {
        return Ok(installed);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("helm"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            "no helm binary (set HELM, run `bash .ci/install-helm`, or put helm on PATH)".into()
        })
}

/// The objects `helm template <release> --namespace <namespace> <extra...>` renders.
pub fn render(helm: &Path, release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/gitlab-registry-operator");
    let output = Command::new(helm)
        .arg("template")
        .arg(release)
        .arg(&chart)
        .args(["--namespace", namespace])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm.display()));
    assert!(
        output.status.success(),
        "helm template {extra:?} fails: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("helm template {extra:?} renders invalid YAML: {e}"));
    documents.into_iter().filter(|d| !d.is_null()).collect()
}

/// The rendered RBAC objects: ServiceAccount, (Cluster)Roles and (Cluster)RoleBindings.
pub fn rbac_objects(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "Role"
                        | "ClusterRole"
                        | "RoleBinding"
                        | "ClusterRoleBinding"
                )
            )
        })
        .collect()
}
