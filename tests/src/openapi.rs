//! Checks API answers against the daemon's own `/v1/openapi.json`: every
//! (method, path, status) a test sees must be documented, and the body must
//! validate against the documented schema.

use http::{Method, StatusCode};
use serde_json::{json, Value};

/// The parsed OpenAPI document.
pub struct Contract {
    doc: Value,
}

impl Contract {
    /// Wraps the document.
    pub fn new(doc: Value) -> Self {
        assert_eq!(doc["openapi"], "3.1.0", "not an OpenAPI 3.1 document");
        Self { doc }
    }

    /// Panics unless `body` is what the document promises for this answer.
    pub fn check(&self, method: &Method, template: &str, status: StatusCode, body: &Value) {
        let m = method.as_str().to_ascii_lowercase();
        let op = &self.doc["paths"][template][&m];
        assert!(op.is_object(), "{method} {template} is not in openapi.json");
        let resp = &op["responses"][status.as_str()];
        assert!(resp.is_object(), "{method} {template} answered {status}, which openapi.json does not document; body: {body}");
        let Some(schema_ref) = resp["content"]["application/json"]["schema"]["$ref"].as_str()
        else {
            assert!(
                body.is_null(),
                "{method} {template} {status}: documented without a body but got {body}"
            );
            return;
        };
        let schema = json!({ "$ref": schema_ref, "components": self.doc["components"] });
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("openapi.json schema {schema_ref} does not compile: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{method} {template} {status}: body does not match {schema_ref}: {errors:?}\nbody: {body}");
    }
}
