use serde_json::json;

use super::*;

fn fields(errs: &[FieldError]) -> Vec<&str> {
    errs.iter().map(|e| e.field.as_str()).collect()
}

#[test]
fn list_query_defaults_and_decoding() {
    let q = ListQuery::parse(None, &["created_at", "state"], "state").expect("defaults");
    assert_eq!(
        (q.page, q.page_size, q.sort.as_str(), q.asc),
        (1, 20, "created_at", false)
    );
    let q = ListQuery::parse(
        Some("page=2&page-size=5&sort=state&order-by=asc&state=run%6Eing"),
        &["created_at", "state"],
        "state",
    )
    .expect("valid query");
    assert_eq!(
        (q.page, q.page_size, q.sort.as_str(), q.asc),
        (2, 5, "state", true)
    );
    assert_eq!(q.filter.as_deref(), Some("running"), "percent-decoding");
    // A truncated escape is kept literally rather than read past the end.
    let q = ListQuery::parse(Some("query=a%2"), &["created_at"], "query").expect("valid");
    assert_eq!(q.filter.as_deref(), Some("a%2"));
}

#[test]
fn list_query_reports_every_bad_parameter() {
    let errs = ListQuery::parse(
        Some("page=0&page-size=101&sort=name&order-by=up&bogus=1&page=3"),
        &["created_at"],
        "state",
    )
    .expect_err("invalid");
    let f = fields(&errs);
    for want in ["page", "page-size", "sort", "order-by", "bogus"] {
        assert!(f.contains(&want), "{want} missing from {f:?}");
    }
    assert_eq!(
        f.iter().filter(|x| **x == "page").count(),
        2,
        "repeated page is an error too: {f:?}"
    );
}

#[test]
fn exec_body_needs_exactly_one_of_command_and_argv() {
    let ok = ExecRequestBody::parse(&json!({"command": "echo hi", "timeout": 5})).expect("command");
    assert_eq!(ok.argv, ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(ok.timeout_secs, 5);
    let ok = ExecRequestBody::parse(&json!({"argv": ["ls", "-l"], "cwd": "/tmp"})).expect("argv");
    assert_eq!(ok.argv, ["ls", "-l"]);
    assert_eq!(ok.timeout_secs, 60);
    let errs = ExecRequestBody::parse(&json!({"command": "x", "argv": ["y"]})).expect_err("both");
    assert_eq!(fields(&errs), ["argv"]);
    let errs = ExecRequestBody::parse(&json!({})).expect_err("none");
    assert_eq!(fields(&errs), ["command"]);
    let errs = ExecRequestBody::parse(
        &json!({"argv": ["a", 1], "cwd": "rel", "timeout": 0, "envs": {"A=B": "x"}}),
    )
    .expect_err("bad");
    let f = fields(&errs);
    for want in ["argv[1]", "cwd", "timeout", "envs.A=B"] {
        assert!(f.contains(&want), "{want} missing from {f:?}");
    }
}

#[test]
fn create_defaults_and_rules() {
    let c = CreateRequest::parse(&json!({})).expect("empty body is all defaults");
    assert_eq!(
        (
            c.template_name.as_str(),
            c.vcpu,
            c.memory_mib,
            c.timeout_secs
        ),
        (DEFAULT_TEMPLATE, 1, 1024, 300)
    );
    // The SDK sends null for omitted optionals in some versions.
    let c =
        CreateRequest::parse(&json!({"network_policy": null, "env_vars": null})).expect("nulls");
    assert!(c.network_policy.is_none());
    let errs = CreateRequest::parse(
        &json!({"mounts": [{"type": "s3"}], "otel_export": true, "memory": 1025}),
    )
    .expect_err("unsupported");
    let f = fields(&errs);
    for want in ["mounts", "otel_export", "memory"] {
        assert!(f.contains(&want), "{want} missing from {f:?}");
    }
}

#[test]
fn resume_converts_minutes_and_restore_keeps_seconds() {
    let r = RestoreRequest::parse_resume(&json!({"snapshot_name": " base ", "timeout_min": 2}))
        .expect("resume");
    assert_eq!((r.snapshot_name.as_str(), r.timeout_secs), ("base", 120));
    let r = RestoreRequest::parse_restore(&json!({"snapshot_name": "base", "timeout": 2}))
        .expect("restore");
    assert_eq!(r.timeout_secs, 2);
    let errs = RestoreRequest::parse_resume(&json!({"snapshot_name": "base", "timeout": 2}))
        .expect_err("wrong spelling");
    assert_eq!(fields(&errs), ["timeout"]);
}

#[test]
fn policy_update_accepts_bare_or_wrapped() {
    let bare = parse_policy_update(&json!({"mode": "deny-all"})).expect("bare");
    let wrapped =
        parse_policy_update(&json!({"network_policy": {"mode": "deny-all"}})).expect("wrapped");
    assert_eq!(bare, wrapped);
    let errs =
        parse_policy_update(&json!({"mode": "custom", "allow_domains": ["*"]})).expect_err("bad");
    assert_eq!(fields(&errs), ["network_policy.allow_domains[0]"]);
}
