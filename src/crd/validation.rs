//! Validation of a manifest the way the apiserver validates it against our CRDs: the CEL
//! rules (`x-kubernetes-validations`) of the generated schema, evaluated client-side, so that
//! `apply`/`plan` and tests give the messages a cluster would give.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;

/// The `openAPIV3Schema` of a CRD's first version, as JSON.
pub fn open_api_schema(crd: &CustomResourceDefinition) -> serde_json::Value {
    crd.spec
        .versions
        .first()
        .and_then(|version| version.schema.as_ref())
        .and_then(|schema| schema.open_api_v3_schema.as_ref())
        .and_then(|schema| serde_json::to_value(schema).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Evaluates the CRD's CEL rules on `object`; each failure as `field: message`.
pub fn cel_errors(crd: &CustomResourceDefinition, object: &serde_json::Value) -> Vec<String> {
    let schema = open_api_schema(crd);
    match Validator::new().validate(&schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.as_slice().iter().map(ToString::to_string).collect(),
    }
}
