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

/// One failed CEL rule, with the field it is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CelFailure {
    pub field: String,
    pub message: String,
}

/// Like [`cel_errors`], keeping the field apart from the message.
pub fn cel_failures(crd: &CustomResourceDefinition, object: &serde_json::Value) -> Vec<CelFailure> {
    let schema = open_api_schema(crd);
    match Validator::new().validate(&schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .as_slice()
            .iter()
            .map(|error| CelFailure {
                field: if error.field_path.is_empty() {
                    "-".into()
                } else {
                    error.field_path.clone()
                },
                message: error.message.clone(),
            })
            .collect(),
    }
}
