//! `GET /v1/openapi.json`: the OpenAPI 3.1 description of the API. The API
//! tests validate every response they receive against the schemas here.

use serde_json::{json, Value};

fn err_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        let (desc, schema) = match *c {
            "400" => ("Invalid fields: one entry per bad field", "ValidationError"),
            "401" => ("Missing or invalid API key", "Error"),
            "404" => ("Not found (or owned by another organization)", "Error"),
            "409" => ("The object's state forbids the operation", "Error"),
            "413" => ("Request body larger than 1 MiB", "Error"),
            "429" => ("Organization sandbox limit reached", "Error"),
            "500" => ("Runtime or store failure", "Error"),
            _ => ("No runner capacity", "Error"),
        };
        m.insert(
            (*c).to_string(),
            json!({"description": desc, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
        );
    }
    Value::Object(m)
}

fn ok(code: &str, desc: &str, schema: &str) -> (String, Value) {
    (
        code.to_string(),
        json!({"description": desc, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
    )
}

fn op(
    summary: &str,
    body: Option<&str>,
    success: (String, Value),
    errors: &[&str],
    params: Value,
) -> Value {
    let mut responses = err_responses(errors);
    if let Some(m) = responses.as_object_mut() {
        m.insert(success.0, success.1);
    }
    let mut o = json!({"summary": summary, "responses": responses, "parameters": params});
    if let (Some(schema), Some(m)) = (body, o.as_object_mut()) {
        m.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
        );
    }
    o
}

fn id_param(name: &str) -> Value {
    json!([{"name": name, "in": "path", "required": true, "schema": {"type": "string"}}])
}

fn list_params(sorts: &[&str], filter: Value) -> Value {
    json!([
        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 1}},
        {"name": "page-size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
        {"name": "sort", "in": "query", "schema": {"type": "string", "enum": sorts, "default": "created_at"}},
        {"name": "order-by", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}},
        filter
    ])
}

/// The document.
pub fn document() -> Value {
    let mut doc = base_document();
    add_links(&mut doc);
    doc
}

/// The document without its links.
fn base_document() -> Value {
    const STATES: [&str; 7] = [
        "starting",
        "running",
        "snapshotting",
        "paused",
        "unpausing",
        "deleting",
        "deleted",
    ];
    let none = json!([]);
    let empty = (String::from("204"), json!({"description": "Deleted"}));
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tollgate sandbox API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Leap0-compatible sandbox, snapshot and network-policy API served by tollgate. \
                With the network-namespace runtime a snapshot records template, compute, environment and \
                network policy; it holds no memory state. Injected header values are write-only: \
                responses show \"[REDACTED]\"."
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/snapshot/resume": {"post": op("Restore a snapshot (timeout in minutes)", Some("ResumeRequest"),
                ok("201", "Sandbox restored", "Sandbox"), &["400", "401", "404", "409", "413", "429", "500", "503"], none.clone())},
            "/v1/snapshot/restore": {"post": op("Restore a snapshot (SDK spelling, timeout in seconds)", Some("RestoreRequest"),
                ok("201", "Sandbox restored", "Sandbox"), &["400", "401", "404", "409", "413", "429", "500", "503"], none.clone())},
            "/v1/sandbox": {"post": op("Create a sandbox from a template", Some("CreateSandboxRequest"),
                ok("201", "Sandbox created", "Sandbox"), &["400", "401", "413", "429", "500", "503"], none.clone())},
            "/v1/sandboxes": {"get": op("List the organization's sandboxes", None,
                ok("200", "A page of sandboxes", "SandboxList"), &["400", "401"],
                list_params(&["created_at", "state"], json!({"name": "state", "in": "query", "schema": {"type": "string", "enum": STATES}})))},
            "/v1/sandbox/{id}/": {
                "get": op("Get a sandbox", None, ok("200", "The sandbox", "Sandbox"), &["401", "404"], id_param("id")),
                "delete": op("Delete a sandbox and release its network", None, empty.clone(), &["401", "404", "409", "500"], id_param("id"))
            },
            "/v1/sandbox/{id}/pause": {"post": op("Pause a sandbox", None, ok("201", "The paused sandbox", "Sandbox"),
                &["401", "404", "409", "500"], id_param("id"))},
            "/v1/sandbox/{id}/resume": {"post": op("Thaw a paused sandbox", None, ok("201", "The running sandbox", "Sandbox"),
                &["401", "404", "409", "500"], id_param("id"))},
            "/v1/sandbox/{id}/snapshot/create": {"post": op("Snapshot a sandbox", Some("CreateSnapshotRequest"),
                ok("201", "The snapshot", "Snapshot"), &["400", "401", "404", "409", "500"], id_param("id"))},
            "/v1/sandbox/{id}/network_policy": {"put": op("Replace a sandbox's network policy", Some("NetworkPolicy"),
                ok("200", "The sandbox with its new policy", "Sandbox"), &["400", "401", "404", "409"], id_param("id"))},
            "/v1/sandbox/{id}/process/execute": {"post": op("Run a command inside a sandbox", Some("ExecRequest"),
                ok("200", "The command's result", "ExecResult"), &["400", "401", "404", "409", "500"], id_param("id"))},
            "/v1/sandbox/{id}/network/events": {"get": op("The sandbox's network events: eBPF drops and connections steered to its proxy", None,
                ok("200", "Events, oldest first", "NetEventList"), &["400", "401", "404"],
                json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
                       {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}]))},
            "/v1/sandbox/{id}/network/counters": {"get": op("Packets per eBPF verdict since the sandbox's filter was attached", None,
                ok("200", "Counters by reason", "NetCounters"), &["401", "404", "409", "500"], id_param("id"))},
            "/v1/sandbox/{id}/ca.pem": {"get": op("The sandbox's CA certificate (PEM): what the sandbox trusts for intercepted TLS. \
                The private key never leaves the host. Inside the sandbox the same certificate is served without credentials at http://10.0.2.2/ca.pem", None,
                (String::from("200"), json!({"description": "The CA certificate, PEM",
                    "content": {"application/x-pem-file": {"schema": {"type": "string"}}}})),
                &["401", "404", "409"], id_param("id"))},
            "/v1/snapshots": {"get": op("List the organization's snapshots", None,
                ok("200", "A page of snapshots", "SnapshotList"), &["400", "401"],
                list_params(&["created_at", "template_id"], json!({"name": "query", "in": "query", "schema": {"type": "string", "maxLength": 64}})))},
            "/v1/snapshot/{id}": {"delete": op("Delete a snapshot (by id or name)", None, empty, &["401", "404"], id_param("id"))},
            "/v1/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY (the bare key is accepted too)"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["message"], "additionalProperties": false,
                    "properties": {"message": {"type": "string"}}},
                "ValidationError": {"type": "object", "required": ["message", "errors"], "additionalProperties": false,
                    "properties": {"message": {"type": "string"}, "errors": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["field", "error"], "additionalProperties": false,
                        "properties": {"field": {"type": "string"}, "error": {"type": "string"}}}}}},
                "NetworkPolicy": {"type": "object", "required": ["mode"], "additionalProperties": false, "properties": {
                    "mode": {"type": "string", "enum": ["allow-all", "deny-all", "custom"]},
                    "allow_domains": {"type": "array", "maxItems": 50, "items": {"type": "string"},
                        "description": "example.com or *.example.com (any depth below, never the apex)"},
                    "allow_cidrs": {"type": "array", "maxItems": 10, "items": {"type": "string"}},
                    "transforms": {"type": "array", "maxItems": 20, "items": {"$ref": "#/components/schemas/Transform"}}}},
                "Transform": {"type": "object", "required": ["domain"], "additionalProperties": false, "properties": {
                    "domain": {"type": "string"},
                    "inject_headers": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Write-only: responses show [REDACTED]"},
                    "strip_headers": {"type": "array", "items": {"type": "string"}}}},
                "ResumeRequest": {"type": "object", "required": ["snapshot_name"], "additionalProperties": false, "properties": {
                    "snapshot_name": {"type": "string", "minLength": 1, "maxLength": 64},
                    "timeout_min": {"type": "integer", "minimum": 1, "maximum": 480, "default": 5},
                    "auto_pause": {"type": "boolean", "default": false},
                    "network_policy": {"$ref": "#/components/schemas/NetworkPolicy"}}},
                "RestoreRequest": {"type": "object", "required": ["snapshot_name"], "additionalProperties": false, "properties": {
                    "snapshot_name": {"type": "string", "minLength": 1, "maxLength": 64},
                    "timeout": {"type": "integer", "minimum": 1, "maximum": 28800, "default": 300},
                    "auto_pause": {"type": "boolean", "default": false},
                    "network_policy": {"$ref": "#/components/schemas/NetworkPolicy"}}},
                "CreateSandboxRequest": {"type": "object", "additionalProperties": false, "properties": {
                    "template_name": {"type": "string", "maxLength": 64, "default": "system/debian:bookworm"},
                    "vcpu": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1},
                    "memory": {"type": "integer", "minimum": 512, "maximum": 8192, "multipleOf": 2, "default": 1024},
                    "timeout": {"type": "integer", "minimum": 1, "maximum": 28800, "default": 300},
                    "auto_pause": {"type": "boolean", "default": false},
                    "env_vars": {"type": "object", "additionalProperties": {"type": "string"}},
                    "network_policy": {"$ref": "#/components/schemas/NetworkPolicy"},
                    "mounts": {"type": "array", "maxItems": 0, "description": "Not supported on this host"},
                    "otel_export": {"type": "boolean", "const": false}}},
                "CreateSnapshotRequest": {"type": "object", "additionalProperties": false, "properties": {
                    "name": {"type": "string", "maxLength": 64}, "kill_sandbox_after": {"type": "boolean", "default": false}}},
                "ExecRequest": {"type": "object", "additionalProperties": false, "properties": {
                    "command": {"type": "string", "description": "Run with /bin/sh -c"},
                    "argv": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    "cwd": {"type": "string"},
                    "envs": {"type": "object", "additionalProperties": {"type": "string"}},
                    "timeout": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 60}}},
                "ExecResult": {"type": "object", "required": ["exit_code", "stdout", "stderr"], "additionalProperties": false, "properties": {
                    "exit_code": {"type": "integer"}, "stdout": {"type": "string"}, "stderr": {"type": "string"}}},
                "Sandbox": {"type": "object", "additionalProperties": false,
                    "required": ["id", "template_id", "vcpu", "memory_mib", "memory", "disk_mib", "disk", "timeout", "state", "auto_pause", "network_policy", "created_at"],
                    "properties": {
                        "id": {"type": "string", "pattern": "^sbx-[a-z0-9]{20}$"},
                        "template_id": {"type": "string"},
                        "vcpu": {"type": "integer", "minimum": 1},
                        "memory_mib": {"type": "integer"}, "memory": {"type": "integer"},
                        "disk_mib": {"type": "integer"}, "disk": {"type": "integer"},
                        "timeout": {"type": "integer", "description": "seconds"},
                        "state": {"type": "string", "enum": STATES},
                        "auto_pause": {"type": "boolean"},
                        "network_policy": {"$ref": "#/components/schemas/NetworkPolicy"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "status_reason": {"type": "string"}}},
                "SandboxListItem": {"type": "object", "additionalProperties": false,
                    "required": ["id", "template_id", "state", "launch_time", "state_change_time", "timeout_at", "created_at"],
                    "properties": {
                        "id": {"type": "string"}, "template_id": {"type": "string"},
                        "state": {"type": "string", "enum": STATES},
                        "launch_time": {"type": "string", "format": "date-time"},
                        "state_change_time": {"type": "string", "format": "date-time"},
                        "timeout_at": {"type": "integer", "description": "unix seconds"},
                        "created_at": {"type": "string", "format": "date-time"}}},
                "SandboxList": {"type": "object", "required": ["items", "total_items"], "additionalProperties": false, "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/SandboxListItem"}},
                    "total_items": {"type": "integer", "minimum": 0}}},
                "Snapshot": {"type": "object", "additionalProperties": false,
                    "required": ["id", "name", "template_id", "vcpu", "memory_mib", "memory", "disk_mib", "disk", "network_policy", "created_at"],
                    "properties": {
                        "id": {"type": "string", "pattern": "^snp-[a-z0-9]{20}$"},
                        "name": {"type": "string"}, "template_id": {"type": "string"},
                        "vcpu": {"type": "integer"}, "memory_mib": {"type": "integer"}, "memory": {"type": "integer"},
                        "disk_mib": {"type": "integer"}, "disk": {"type": "integer"},
                        "network_policy": {"$ref": "#/components/schemas/NetworkPolicy"},
                        "created_at": {"type": "string", "format": "date-time"}}},
                "NetEvent": {"type": "object", "additionalProperties": false,
                    "required": ["seq", "time_ms", "sandbox_id", "kind", "protocol", "destination", "port", "reason"],
                    "properties": {
                        "seq": {"type": "integer", "minimum": 1},
                        "time_ms": {"type": "integer", "description": "unix milliseconds"},
                        "sandbox_id": {"type": "string"},
                        "kind": {"type": "string", "enum": ["denied", "steered"]},
                        "protocol": {"type": "string"},
                        "destination": {"type": ["string", "null"]},
                        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
                        "name": {"type": "string"},
                        "reason": {"type": "string", "description": "stable snake_case code: drop_floor, drop_deny_all, steered, ..."}}},
                "NetEventList": {"type": "object", "required": ["items", "total_items"], "additionalProperties": false, "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/NetEvent"}},
                    "total_items": {"type": "integer", "minimum": 0}}},
                "NetCounters": {"type": "object", "required": ["sandbox_id", "counters"], "additionalProperties": false, "properties": {
                    "sandbox_id": {"type": "string"},
                    "counters": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}}},
                "SnapshotList": {"type": "object", "required": ["items", "total_items"], "additionalProperties": false, "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Snapshot"}},
                    "total_items": {"type": "integer", "minimum": 0}}}
            }
        }
    })
}

/// `operationRef` of `method` on `path`.
fn op_ref(path: &str, method: &str) -> String {
    format!(
        "#/paths/{}/{method}",
        path.replace('~', "~0").replace('/', "~1")
    )
}

/// OpenAPI links: what a created sandbox's or snapshot's id leads to, so
/// that clients (and stateful API fuzzers) can follow them.
fn add_links(doc: &mut Value) {
    let by_id = [
        ("GetSandbox", "/v1/sandbox/{id}/", "get"),
        ("DeleteSandbox", "/v1/sandbox/{id}/", "delete"),
        ("PauseSandbox", "/v1/sandbox/{id}/pause", "post"),
        ("ResumeSandbox", "/v1/sandbox/{id}/resume", "post"),
        (
            "SnapshotSandbox",
            "/v1/sandbox/{id}/snapshot/create",
            "post",
        ),
        ("SetNetworkPolicy", "/v1/sandbox/{id}/network_policy", "put"),
        ("Execute", "/v1/sandbox/{id}/process/execute", "post"),
        ("NetworkEvents", "/v1/sandbox/{id}/network/events", "get"),
        (
            "NetworkCounters",
            "/v1/sandbox/{id}/network/counters",
            "get",
        ),
        ("SandboxCa", "/v1/sandbox/{id}/ca.pem", "get"),
    ];
    let sandbox_links: serde_json::Map<String, Value> = by_id
        .iter()
        .map(|(name, path, method)| {
            (
                (*name).to_string(),
                json!({"operationRef": op_ref(path, method), "parameters": {"id": "$response.body#/id"}}),
            )
        })
        .collect();
    for (path, method, code) in [
        ("/v1/sandbox", "post", "201"),
        ("/v1/snapshot/resume", "post", "201"),
        ("/v1/snapshot/restore", "post", "201"),
        ("/v1/sandbox/{id}/pause", "post", "201"),
        ("/v1/sandbox/{id}/resume", "post", "201"),
    ] {
        if let Some(r) = doc
            .pointer_mut(&format!(
                "{}/responses/{code}",
                op_ref(path, method).trim_start_matches('#')
            ))
            .and_then(Value::as_object_mut)
        {
            r.insert("links".into(), Value::Object(sandbox_links.clone()));
        }
    }
    let snapshot_links = json!({
        "DeleteSnapshot": {"operationRef": op_ref("/v1/snapshot/{id}", "delete"), "parameters": {"id": "$response.body#/id"}},
        "ResumeSnapshot": {"operationRef": op_ref("/v1/snapshot/resume", "post"), "requestBody": {"snapshot_name": "$response.body#/name"}},
        "RestoreSnapshot": {"operationRef": op_ref("/v1/snapshot/restore", "post"), "requestBody": {"snapshot_name": "$response.body#/name"}}
    });
    if let Some(r) = doc
        .pointer_mut(&format!(
            "{}/responses/201",
            op_ref("/v1/sandbox/{id}/snapshot/create", "post").trim_start_matches('#')
        ))
        .and_then(Value::as_object_mut)
    {
        r.insert("links".into(), snapshot_links);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_link_points_at_a_documented_operation() {
        let doc = document();
        let mut links = 0;
        for (_, item) in doc["paths"].as_object().expect("paths") {
            for (_, op) in item.as_object().expect("path item") {
                for (_, resp) in op["responses"].as_object().into_iter().flatten() {
                    for (name, link) in resp["links"].as_object().into_iter().flatten() {
                        let r = link["operationRef"].as_str().expect("operationRef");
                        let target = doc.pointer(r.trim_start_matches('#'));
                        assert!(
                            target.is_some_and(|t| t["responses"].is_object()),
                            "link {name}: {r} is no operation"
                        );
                        links += 1;
                    }
                }
            }
        }
        // Five sandbox-returning operations × ten links, plus three from a snapshot.
        assert_eq!(links, 53);
    }
}
