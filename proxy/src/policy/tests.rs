//! Tests pinning DESIGN.md "Policy semantics" and THREATS #4–9, #12, #13, #25.
//! Tables first; every row names what it checks.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::{json, Value};

use super::domain::{parse_host, Host, NameError, Pattern, Side};
use super::*;

// === helpers ===

const P: &str = "network_policy";

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test network {s}: {e}"))
}

fn ok(v: Value) -> NetworkPolicy {
    match NetworkPolicy::from_json(&v, P) {
        Ok(p) => p,
        Err(e) => panic!("expected {v} to validate, got {e:#?}"),
    }
}

fn errs(v: Value) -> Vec<FieldError> {
    match NetworkPolicy::from_json(&v, P) {
        Ok(p) => panic!("expected {v} to be rejected, got {p:#?}"),
        Err(e) => e,
    }
}

/// The single error of a policy, asserting there is exactly one.
fn one_err(v: Value) -> FieldError {
    let e = errs(v.clone());
    assert_eq!(e.len(), 1, "expected one error for {v}, got {e:#?}");
    e.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn fields(e: &[FieldError]) -> Vec<&str> {
    e.iter().map(|e| e.field.as_str()).collect()
}

fn compile(v: Value) -> CompiledPolicy {
    CompiledPolicy::new(&ok(v), Arc::new(Floor::platform()))
}

fn tunnel_name(n: &str) -> Verdict {
    Verdict::Tunnel {
        dial: Dial::Name(n.to_string()),
    }
}

fn tunnel_addr(a: &str) -> Verdict {
    Verdict::Tunnel {
        dial: Dial::Addr(ip(a)),
    }
}

fn deny(r: DenyReason) -> Verdict {
    Verdict::Deny(r)
}

/// The transform domain an `Intercept` verdict carries, or `None`.
fn intercepted(v: &Verdict) -> Option<(&str, &str)> {
    match v {
        Verdict::Intercept { name, transform } => Some((name, &transform.domain)),
        _ => None,
    }
}

const PUBLIC: &str = "93.184.215.14";
const CANARY: &str = "198.51.100.77";

/// Every floor address of THREATS #9, literal and in IPv6 disguise.
const FLOOR_ADDRS: &[&str] = &[
    "169.254.169.254",
    "169.254.170.2",
    "100.100.100.200",
    "fd00:ec2::254",
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "::1",
    "::",
    "fe80::1",
    "febf::1",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    // IPv4-mapped, -compatible and SIIT-translated
    "::ffff:169.254.169.254",
    "::ffff:127.0.0.1",
    "::169.254.169.254",
    "::ffff:0:a9fe:a9fe",
    // NAT64 well-known and local-use (/48 and /96 layouts)
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::127.0.0.1",
    "64:ff9b:1:a9fe:a9:fe00::",
    "64:ff9b:1::a9fe:a9fe",
    // 6to4
    "2002:a9fe:a9fe::1",
    "2002:7f00:1::",
    // Teredo: client 169.254.169.254 stored inverted; server 169.254.169.254
    "2001:0:4136:e378:8000:63bf:5601:5601",
    "2001:0:a9fe:a9fe:8000:63bf:f7f7:f7f7",
    // ISATAP interface ids
    "2001:db8::5efe:a9fe:a9fe",
    "2001:db8::200:5efe:7f00:1",
];

// === validation: shape, types, paths ===

#[test]
fn mode_is_required_and_closed() {
    let cases: &[(Value, Option<Mode>, &str)] = &[
        (json!({"mode": "allow-all"}), Some(Mode::AllowAll), ""),
        (json!({"mode": "deny-all"}), Some(Mode::DenyAll), ""),
        (json!({"mode": "custom"}), Some(Mode::Custom), ""),
        (json!({}), None, "is required"),
        (json!({"mode": null}), None, "is required"),
        (json!({"mode": "allow_all"}), None, "must be one of"),
        (json!({"mode": "ALLOW-ALL"}), None, "must be one of"),
        (json!({"mode": ""}), None, "must be one of"),
        (json!({"mode": 1}), None, "must be a string"),
        (json!({"mode": ["custom"]}), None, "must be a string"),
    ];
    for (v, want, msg) in cases {
        match want {
            Some(m) => assert_eq!(ok(v.clone()).mode, *m, "{v}"),
            None => {
                let e = one_err(v.clone());
                assert_eq!(e.field, "network_policy.mode", "{v}");
                assert!(e.error.contains(msg), "{v}: {}", e.error);
            }
        }
    }
}

#[test]
fn policy_must_be_an_object() {
    for v in [
        json!(null),
        json!(1),
        json!("custom"),
        json!(["custom"]),
        json!(true),
    ] {
        let e = one_err(v.clone());
        assert_eq!(e.field, "network_policy", "{v}");
        assert!(e.error.starts_with("must be an object"), "{v}: {}", e.error);
    }
}

#[test]
fn unknown_fields_are_errors() {
    let e = errs(json!({
        "mode": "custom",
        "bogus_field": 1,
        "allowDomains": [],
        "transforms": [{"domain": "a.example.com", "inject": {}}],
    }));
    let mut got = fields(&e);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "network_policy.allowDomains",
            "network_policy.bogus_field",
            "network_policy.transforms[0].inject",
        ]
    );
    assert!(
        e.iter().all(|e| e.error.starts_with("unknown field")),
        "{e:#?}"
    );
}

#[test]
fn wrong_json_types_name_the_field() {
    let cases: &[(Value, &str, &str)] = &[
        (
            json!({"mode": "custom", "allow_domains": "a.com"}),
            "network_policy.allow_domains",
            "must be a list of strings",
        ),
        (
            json!({"mode": "custom", "allow_domains": {"a": 1}}),
            "network_policy.allow_domains",
            "must be a list of strings",
        ),
        (
            json!({"mode": "custom", "allow_domains": ["a.com", 7]}),
            "network_policy.allow_domains[1]",
            "must be a string",
        ),
        (
            json!({"mode": "custom", "allow_cidrs": "10.0.0.0/8"}),
            "network_policy.allow_cidrs",
            "must be a list of strings",
        ),
        (
            json!({"mode": "custom", "allow_cidrs": [null]}),
            "network_policy.allow_cidrs[0]",
            "must be a string",
        ),
        (
            json!({"mode": "custom", "transforms": {}}),
            "network_policy.transforms",
            "must be a list of objects",
        ),
        (
            json!({"mode": "custom", "transforms": ["a.com"]}),
            "network_policy.transforms[0]",
            "must be an object",
        ),
        (
            json!({"mode": "custom", "transforms": [{}]}),
            "network_policy.transforms[0].domain",
            "is required",
        ),
        (
            json!({"mode": "custom", "transforms": [{"domain": 5}]}),
            "network_policy.transforms[0].domain",
            "must be a string",
        ),
        (
            json!({"mode": "custom", "transforms": [{"domain": "a.com", "inject_headers": []}]}),
            "network_policy.transforms[0].inject_headers",
            "must be an object",
        ),
        (
            json!({"mode": "custom", "transforms": [{"domain": "a.com", "inject_headers": {"X-Key": 5}}]}),
            "network_policy.transforms[0].inject_headers.X-Key",
            "must be a string",
        ),
        (
            json!({"mode": "custom", "transforms": [{"domain": "a.com", "strip_headers": "Cookie"}]}),
            "network_policy.transforms[0].strip_headers",
            "must be a list of strings",
        ),
        (
            json!({"mode": "custom", "transforms": [{"domain": "a.com", "strip_headers": [true]}]}),
            "network_policy.transforms[0].strip_headers[0]",
            "must be a string",
        ),
    ];
    for (v, field, msg) in cases {
        let e = one_err(v.clone());
        assert_eq!(e.field, *field, "{v}");
        assert!(e.error.contains(msg), "{v}: {}", e.error);
    }
}

#[test]
fn null_optional_fields_mean_omitted() {
    let p = ok(json!({
        "mode": "custom",
        "allow_domains": null,
        "allow_cidrs": null,
        "transforms": [{"domain": "a.example.com", "inject_headers": null, "strip_headers": null}],
    }));
    assert!(p.allow_domains.is_empty() && p.allow_cidrs.is_empty());
    assert_eq!(p.transforms.len(), 1);
}

#[test]
fn every_error_comes_back_at_once() {
    let e = errs(json!({
        "mode": "sometimes",
        "allow_domains": ["ok.example.com", "*", "a.*.com", "ok.example.com"],
        "allow_cidrs": ["10.1.2.3/8", "nope"],
        "transforms": [
            {"domain": "*.com", "inject_headers": {"Host": "x", "Authorization": "a\r\nb"}},
            {"domain": "api.example.com", "strip_headers": ["bad header"]},
        ],
        "bogus_field": true,
    }));
    assert_eq!(
        fields(&e),
        [
            "network_policy.mode",
            "network_policy.allow_domains[1]",
            "network_policy.allow_domains[2]",
            "network_policy.allow_domains[3]",
            "network_policy.allow_cidrs[0]",
            "network_policy.allow_cidrs[1]",
            "network_policy.transforms[0].domain",
            "network_policy.transforms[0].inject_headers.Authorization",
            "network_policy.transforms[0].inject_headers.Host",
            "network_policy.transforms[1].strip_headers[0]",
            "network_policy.bogus_field",
        ]
    );
}

#[test]
fn path_prefix_is_the_callers() {
    let e = one_err_at(json!({"mode": "x"}), "");
    assert_eq!(e.field, "mode");
    let e = one_err_at(
        json!({"mode": "custom", "allow_cidrs": ["x"]}),
        "body.policy",
    );
    assert_eq!(e.field, "body.policy.allow_cidrs[0]");
}

fn one_err_at(v: Value, path: &str) -> FieldError {
    match NetworkPolicy::from_json(&v, path) {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(mut e) => {
            assert_eq!(e.len(), 1, "{e:#?}");
            e.remove(0)
        }
    }
}

#[test]
fn errors_serialize_as_field_and_error() {
    let e = one_err(json!({"mode": "custom", "allow_domains": ["*"]}));
    let v = serde_json::to_value(&e).unwrap_or_default();
    assert_eq!(v["field"], "network_policy.allow_domains[0]");
    assert!(v["error"].as_str().is_some_and(|s| s.ends_with('.')), "{v}");
}

// === validation: limits ===

fn domains(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("d{i}.example.com")).collect()
}

fn cidrs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.{i}.0.0/16")).collect()
}

fn transforms(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"domain": format!("t{i}.example.com")}))
        .collect()
}

#[test]
fn limits_are_50_domains_10_cidrs_20_transforms() {
    let p = ok(
        json!({"mode": "custom", "allow_domains": domains(50), "allow_cidrs": cidrs(10), "transforms": transforms(20)}),
    );
    assert_eq!(
        (
            p.allow_domains.len(),
            p.allow_cidrs.len(),
            p.transforms.len()
        ),
        (50, 10, 20)
    );
    let cases: &[(Value, &str, &str)] = &[
        (
            json!({"mode": "custom", "allow_domains": domains(51)}),
            "network_policy.allow_domains",
            "at most 50",
        ),
        (
            json!({"mode": "custom", "allow_cidrs": cidrs(11)}),
            "network_policy.allow_cidrs",
            "at most 10",
        ),
        (
            json!({"mode": "custom", "transforms": transforms(21)}),
            "network_policy.transforms",
            "at most 20",
        ),
    ];
    for (v, field, msg) in cases {
        let e = one_err(v.clone());
        assert_eq!(e.field, *field);
        assert!(e.error.contains(msg), "{}", e.error);
    }
}

#[test]
fn entries_beyond_a_limit_are_still_checked() {
    let mut d = domains(51);
    d[50] = "*".into();
    let e = errs(json!({"mode": "custom", "allow_domains": d}));
    assert_eq!(
        fields(&e),
        [
            "network_policy.allow_domains",
            "network_policy.allow_domains[50]"
        ]
    );
}

// === validation: domain patterns ===

/// `Ok(normalised)` or `Err(kind)` for every pattern rule of DESIGN.md.
const PATTERNS: &[(&str, Result<&str, NameError>)] = &[
    ("example.com", Ok("example.com")),
    ("EXAMPLE.COM.", Ok("example.com")),
    ("*.example.com", Ok("*.example.com")),
    ("*.Example.COM.", Ok("*.example.com")),
    ("*.co.uk", Ok("*.co.uk")),
    ("a-b.example.com", Ok("a-b.example.com")),
    (
        "r3---sn-abc.googlevideo.com",
        Ok("r3---sn-abc.googlevideo.com"),
    ),
    ("localhost", Ok("localhost")),
    ("bücher.example", Ok("xn--bcher-kva.example")),
    ("BÜCHER.example", Ok("xn--bcher-kva.example")),
    ("*.bücher.example", Ok("*.xn--bcher-kva.example")),
    ("XN--BCHER-KVA.example", Ok("xn--bcher-kva.example")),
    ("例え.テスト", Ok("xn--r8jz45g.xn--zckzah")),
    ("ＥＸＡＭＰＬＥ.com", Ok("example.com")),
    ("example\u{3002}com", Ok("example.com")),
    ("еxample.com", Ok("xn--xample-2of.com")),
    ("1.example.com", Ok("1.example.com")),
    ("*", Err(NameError::BareWildcard)),
    ("*.", Err(NameError::BareWildcard)),
    ("*.com", Err(NameError::ShortWildcard)),
    ("*.com.", Err(NameError::ShortWildcard)),
    ("*.bücher", Err(NameError::ShortWildcard)),
    ("a.*.com", Err(NameError::MidWildcard)),
    ("*foo.com", Err(NameError::MidWildcard)),
    ("foo*.com", Err(NameError::MidWildcard)),
    ("*.*.example.com", Err(NameError::MidWildcard)),
    ("**.example.com", Err(NameError::MidWildcard)),
    ("example.*", Err(NameError::MidWildcard)),
    ("example.com:443", Err(NameError::Port)),
    ("*.example.com:8443", Err(NameError::Port)),
    ("1.2.3.4", Err(NameError::IpLiteral)),
    ("1.2.3.4.", Err(NameError::IpLiteral)),
    ("::1", Err(NameError::IpLiteral)),
    ("2001:db8::1", Err(NameError::IpLiteral)),
    ("[2001:db8::1]", Err(NameError::IpLiteral)),
    ("*.1.2.3.4", Err(NameError::IpLiteral)),
    ("2130706433", Err(NameError::NumericTld)),
    ("127.1", Err(NameError::NumericTld)),
    ("0x7f.1", Err(NameError::NumericTld)),
    ("a.0x7f000001", Err(NameError::NumericTld)),
    ("a..b.com", Err(NameError::EmptyLabel)),
    (".example.com", Err(NameError::EmptyLabel)),
    ("example.com..", Err(NameError::EmptyLabel)),
    ("", Err(NameError::Empty)),
    (".", Err(NameError::Empty)),
    ("a b.com", Err(NameError::BadChar(' '))),
    ("a\0b.com", Err(NameError::BadChar('\0'))),
    ("a_b.com", Err(NameError::BadChar('_'))),
    ("exa$mple.com", Err(NameError::BadChar('$'))),
    ("user@example.com", Err(NameError::BadChar('@'))),
    ("example.com/path", Err(NameError::BadChar('/'))),
    ("xn--a.com", Err(NameError::Idna)),
    ("xn--bcher-kva-.example", Err(NameError::Idna)),
];

#[test]
fn domain_patterns_normalise_or_fail_with_the_right_reason() {
    for (raw, want) in PATTERNS {
        let got = Pattern::parse(raw).map(|p| p.text());
        assert_eq!(got.as_deref().map_err(|e| *e), *want, "pattern {raw:?}");
    }
}

#[test]
fn label_and_name_length_limits() {
    let l63 = "a".repeat(63);
    let l64 = "a".repeat(64);
    // 4 × 63 + 3 dots = 255; trim to exactly 253 and 254.
    let long = format!("{l63}.{l63}.{l63}.{l63}");
    let n253 = &long[long.len() - 253..];
    let n254 = &long[long.len() - 254..];
    assert!(!n253.starts_with('.') && !n254.starts_with('.'));
    let cases: Vec<(String, Result<(), NameError>)> = vec![
        (format!("{l63}.com"), Ok(())),
        (format!("{l64}.com"), Err(NameError::LabelTooLong)),
        (n253.to_string(), Ok(())),
        (format!("{n253}."), Ok(())),
        (n254.to_string(), Err(NameError::TooLong)),
        (format!("*.{}", &n253[2..]), Ok(())),
        (format!("*.{}", &n254[2..]), Err(NameError::TooLong)),
        // A U-label whose A-label exceeds 63 bytes.
        (
            format!("{}.com", "ü".repeat(60)),
            Err(NameError::LabelTooLong),
        ),
        ("a.".repeat(600), Err(NameError::TooLong)),
    ];
    for (raw, want) in cases {
        let got = Pattern::parse(&raw).map(|_| ());
        assert_eq!(got, want, "pattern of length {}", raw.len());
    }
}

#[test]
fn domain_errors_are_sentences_at_the_item_path() {
    let e = errs(
        json!({"mode": "custom", "allow_domains": ["ok.com", "*.com", "a.com:443", "10.0.0.1", "a\u{0}b.com"]}),
    );
    assert_eq!(
        fields(&e),
        [
            "network_policy.allow_domains[1]",
            "network_policy.allow_domains[2]",
            "network_policy.allow_domains[3]",
            "network_policy.allow_domains[4]",
        ]
    );
    assert!(
        e[0].error.contains("fewer than two labels"),
        "{}",
        e[0].error
    );
    assert!(e[1].error.contains("port"), "{}", e[1].error);
    assert!(e[2].error.contains("allow_cidrs"), "{}", e[2].error);
    assert!(
        e[3].error.contains("\\0") || e[3].error.contains("\\u{0}"),
        "{}",
        e[3].error
    );
}

#[test]
fn duplicate_domains_after_normalisation_fail_on_the_later_entry() {
    let e = errs(json!({"mode": "custom", "allow_domains": [
        "example.com", "*.example.com", "EXAMPLE.com.", "*.Example.COM", "bücher.example", "xn--bcher-kva.example", "other.example"
    ]}));
    assert_eq!(
        fields(&e),
        [
            "network_policy.allow_domains[2]",
            "network_policy.allow_domains[3]",
            "network_policy.allow_domains[5]",
        ]
    );
    assert!(e[0].error.contains("allow_domains[0]"), "{}", e[0].error);
    assert!(e[1].error.contains("allow_domains[1]"), "{}", e[1].error);
    assert!(e[2].error.contains("allow_domains[4]"), "{}", e[2].error);
}

#[test]
fn allow_domains_are_stored_normalised() {
    let p = ok(json!({"mode": "custom", "allow_domains": ["EXAMPLE.COM.", "*.Bücher.example"]}));
    assert_eq!(p.allow_domains, ["example.com", "*.xn--bcher-kva.example"]);
}

// === validation: CIDRs ===

#[test]
fn cidrs_normalise_to_canonical_text() {
    let cases: &[(&str, &str)] = &[
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("10.1.2.3/32", "10.1.2.3/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8:0:0::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("::/0", "::/0"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:192.0.2.1", "192.0.2.1/32"),
    ];
    for (raw, want) in cases {
        let p = ok(json!({"mode": "custom", "allow_cidrs": [raw]}));
        assert_eq!(p.allow_cidrs, [*want], "{raw}");
    }
}

#[test]
fn bad_cidrs_are_rejected_with_a_hint() {
    let host_bits: &[(&str, &str)] = &[
        (
            "10.1.2.3/8",
            "10.1.2.3/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            "192.168.1.1/24",
            "192.168.1.1/24 has host bits set; did you mean 192.168.1.0/24?",
        ),
        (
            "2001:db8::1/32",
            "2001:db8::1/32 has host bits set; did you mean 2001:db8::/32?",
        ),
        (
            "::ffff:10.1.2.3/104",
            "::ffff:10.1.2.3/104 has host bits set; did you mean 10.0.0.0/8?",
        ),
    ];
    for (raw, msg) in host_bits {
        let e = one_err(json!({"mode": "custom", "allow_cidrs": [raw]}));
        assert_eq!(e.field, "network_policy.allow_cidrs[0]");
        assert_eq!(e.error, *msg);
    }
    for raw in [
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "10.0.0.0/8/8",
        "foo",
        "",
        " 10.0.0.0/8",
        "010.0.0.0/8",
        "10.0.0.256",
        "fe80::1%eth0",
        "2001:db8::/129",
        "10.0.0.0/-1",
        "10.0.0/8",
    ] {
        let e = one_err(json!({"mode": "custom", "allow_cidrs": [raw]}));
        assert_eq!(e.field, "network_policy.allow_cidrs[0]", "{raw:?}");
        assert!(
            e.error.contains("not an IP address or network"),
            "{raw:?}: {}",
            e.error
        );
    }
}

#[test]
fn duplicate_cidrs_fail_on_the_later_entry() {
    let e = errs(
        json!({"mode": "custom", "allow_cidrs": ["10.0.0.0/8", "1.2.3.4", "10.0.0.0/8", "1.2.3.4/32", "2001:DB8::/32", "2001:db8::/32"]}),
    );
    assert_eq!(
        fields(&e),
        [
            "network_policy.allow_cidrs[2]",
            "network_policy.allow_cidrs[3]",
            "network_policy.allow_cidrs[5]",
        ]
    );
}

// === validation: transforms ===

fn transform_policy(t: Value) -> Value {
    json!({"mode": "custom", "transforms": [t]})
}

#[test]
fn a_valid_transform_is_normalised() {
    let p = ok(transform_policy(json!({
        "domain": "API.Example.com.",
        "inject_headers": {"Authorization": "Bearer sk-1", "X-Trace": "a\tb"},
        "strip_headers": ["Cookie", "cookie", "X-Forwarded-For", "Authorization"],
    })));
    let t = &p.transforms[0];
    assert_eq!(t.domain, "api.example.com");
    assert_eq!(
        t.inject_headers.get("Authorization").map(String::as_str),
        Some("Bearer sk-1")
    );
    assert_eq!(
        t.strip_headers,
        ["cookie", "x-forwarded-for", "authorization"]
    );
}

#[test]
fn reserved_headers_cannot_be_injected() {
    for name in [
        "Host",
        "host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "TE",
        "Trailer",
        "Keep-Alive",
        "Proxy-Authorization",
        "proxy-connection",
        "Proxy-Anything",
    ] {
        let e = one_err(transform_policy(
            json!({"domain": "a.example.com", "inject_headers": {name: "v"}}),
        ));
        assert_eq!(
            e.field,
            format!("network_policy.transforms[0].inject_headers.{name}")
        );
        assert!(
            e.error.contains("cannot be injected"),
            "{name}: {}",
            e.error
        );
    }
}

#[test]
fn header_names_must_be_tokens() {
    let cases: &[(&str, &str)] = &[
        (
            ":authority",
            "network_policy.transforms[0].inject_headers[\":authority\"]",
        ),
        (
            ":path",
            "network_policy.transforms[0].inject_headers[\":path\"]",
        ),
        (
            "X Key",
            "network_policy.transforms[0].inject_headers[\"X Key\"]",
        ),
        (
            "X:Key",
            "network_policy.transforms[0].inject_headers[\"X:Key\"]",
        ),
        (
            "X-Ké",
            "network_policy.transforms[0].inject_headers[\"X-Ké\"]",
        ),
        (
            "X\r\nEvil",
            "network_policy.transforms[0].inject_headers[\"X\\r\\nEvil\"]",
        ),
        ("", "network_policy.transforms[0].inject_headers[\"\"]"),
        (
            "(x)",
            "network_policy.transforms[0].inject_headers[\"(x)\"]",
        ),
    ];
    for (name, path) in cases {
        let e = one_err(transform_policy(
            json!({"domain": "a.example.com", "inject_headers": {*name: "v"}}),
        ));
        assert_eq!(e.field, *path, "{name:?}");
    }
    // RFC 9110 token characters are all fine.
    ok(transform_policy(
        json!({"domain": "a.example.com", "inject_headers": {"X-A!#$%&'*+.^_`|~1": "v"}}),
    ));
    for name in [
        "bad header",
        ":path",
        "X:Y",
        "",
        "Host",
        "content-length",
        "Transfer-Encoding",
    ] {
        let e = one_err(transform_policy(
            json!({"domain": "a.example.com", "strip_headers": ["ok", name]}),
        ));
        assert_eq!(
            e.field, "network_policy.transforms[0].strip_headers[1]",
            "{name:?}"
        );
    }
}

#[test]
fn inject_names_are_unique_case_insensitively() {
    let e = one_err(transform_policy(
        json!({"domain": "a.example.com", "inject_headers": {"Authorization": "a", "authorization": "b"}}),
    ));
    // serde_json keeps keys sorted: "Authorization" < "authorization".
    assert_eq!(
        e.field,
        "network_policy.transforms[0].inject_headers.authorization"
    );
    assert!(e.error.contains("case-insensitive"), "{}", e.error);
}

#[test]
fn bad_header_values_are_rejected_without_echoing_them() {
    for value in [
        "sk-SECRET\r\nX-Evil: 1",
        "sk-SECRET\n",
        "sk-SECRET\r",
        "sk-SECRET\0",
        "sk-SECRET\u{7f}",
        "sk-SECRET\u{1b}[0m",
    ] {
        let e = one_err(transform_policy(
            json!({"domain": "a.example.com", "inject_headers": {"Authorization": value}}),
        ));
        assert_eq!(
            e.field,
            "network_policy.transforms[0].inject_headers.Authorization"
        );
        assert!(e.error.contains("CR, LF, NUL"), "{}", e.error);
        let shown = format!("{e:?} {}", serde_json::to_string(&e).unwrap_or_default());
        assert!(!shown.contains("SECRET"), "value leaked: {shown}");
    }
    let long = format!("sk-SECRET{}", "x".repeat(MAX_HEADER_VALUE_LEN));
    let e = one_err(transform_policy(
        json!({"domain": "a.example.com", "inject_headers": {"Authorization": long}}),
    ));
    assert!(
        !e.error.contains("SECRET") && e.error.contains("longer"),
        "{}",
        e.error
    );
}

#[test]
fn transform_domains_follow_pattern_rules_and_must_be_unique() {
    let e = errs(json!({"mode": "custom", "transforms": [
        {"domain": "api.example.com"},
        {"domain": "API.example.com."},
        {"domain": "*.example.com"},
        {"domain": "*"},
        {"domain": "a.*.example.com"},
    ]}));
    assert_eq!(
        fields(&e),
        [
            "network_policy.transforms[1].domain",
            "network_policy.transforms[3].domain",
            "network_policy.transforms[4].domain",
        ]
    );
    assert!(
        e[0].error.contains("transforms[0].domain"),
        "{}",
        e[0].error
    );
}

#[test]
fn deny_all_accepts_inert_lists() {
    let p = ok(
        json!({"mode": "deny-all", "allow_domains": ["a.example.com"], "allow_cidrs": ["10.0.0.0/8"], "transforms": [{"domain": "a.example.com", "inject_headers": {"X": "y"}}]}),
    );
    let c = CompiledPolicy::new(&p, Arc::new(Floor::platform()));
    for (name, dst) in [(Some("a.example.com"), PUBLIC), (None, "10.1.1.1")] {
        assert_eq!(
            c.decide(name, ip(dst), 443, Proto::Tcp),
            deny(DenyReason::DenyAll)
        );
    }
    assert!(!c.name_allowed("a.example.com"));
    assert!(c.transform_for("a.example.com").is_none());
}

// === redaction and round trip ===

#[test]
fn redacted_hides_every_injected_value() {
    let p = ok(json!({"mode": "custom", "transforms": [
        {"domain": "a.example.com", "inject_headers": {"Authorization": "Bearer sk-SECRET-1"}},
        {"domain": "b.example.com", "inject_headers": {"X-Api-Key": "sk-SECRET-2", "X-Other": "sk-SECRET-3"}},
    ]}));
    let r = p.redacted();
    let text = serde_json::to_string(&r).unwrap_or_default();
    assert!(!text.contains("SECRET"), "{text}");
    assert_eq!(text.matches(REDACTED).count(), 3, "{text}");
    assert_eq!(
        r.transforms[1]
            .inject_headers
            .get("X-Api-Key")
            .map(String::as_str),
        Some(REDACTED)
    );
    // The original keeps its secrets.
    assert_eq!(
        p.transforms[0]
            .inject_headers
            .get("Authorization")
            .map(String::as_str),
        Some("Bearer sk-SECRET-1")
    );
}

#[test]
fn normalised_policies_round_trip() {
    let p = ok(
        json!({"mode": "custom", "allow_domains": ["Bücher.example."], "allow_cidrs": ["10.1.2.3"], "transforms": [{"domain": "*.API.example.com", "inject_headers": {"A": "b"}, "strip_headers": ["C"]}]}),
    );
    let again = NetworkPolicy::from_json(&serde_json::to_value(&p).unwrap_or_default(), P);
    assert_eq!(again.as_ref(), Ok(&p));
    assert_eq!(p.normalized(P).as_ref(), Ok(&p));
    let raw = NetworkPolicy {
        mode: Mode::Custom,
        allow_domains: vec!["EXAMPLE.com".into(), "*".into()],
        allow_cidrs: vec![],
        transforms: vec![],
    };
    let e = raw.normalized(P).err().unwrap_or_default();
    assert_eq!(fields(&e), ["network_policy.allow_domains[1]"]);
    assert_eq!(
        NetworkPolicy::allow_all().normalized(P),
        Ok(NetworkPolicy::allow_all())
    );
}

// === floor ===

#[test]
fn floor_covers_every_threat_9_address_and_disguise() {
    let floor = Floor::platform();
    for a in FLOOR_ADDRS {
        assert!(floor.contains(ip(a)), "{a} must be floor");
    }
}

#[test]
fn floor_leaves_public_and_private_alone() {
    let floor = Floor::platform();
    for a in [
        "8.8.8.8",
        "1.1.1.1",
        PUBLIC,
        "10.0.0.1",
        "100.64.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "fd00::1",
        "126.255.255.255",
        "128.0.0.1",
        "169.253.255.255",
        "169.255.0.0",
        "223.255.255.255",
        "100.100.100.199",
        "100.100.100.201",
        "fec0::1",
        "fe7f::1",
        "fec0::",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        // Teredo with public server 65.54.227.120 and public client 8.8.8.8.
        "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
        "fd00:ec2::253",
    ] {
        assert!(!floor.contains(ip(a)), "{a} must not be floor");
    }
}

#[test]
fn floor_takes_operator_host_and_sandbox_ranges() {
    let mut extra = vec![
        net("10.9.0.0/16"),
        net("192.0.2.1/32"),
        net("2001:db8:1::/48"),
    ];
    // Many sandbox addresses, as the control plane adds them.
    extra.extend(
        (0..2000u32)
            .map(|i| IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(0x0a64_0000 + 2 * i)))),
    );
    let floor = Floor::new(extra);
    for a in [
        "10.9.1.1",
        "::ffff:10.9.1.1",
        "64:ff9b::a09:101",
        "2002:a09:101::",
        "192.0.2.1",
        "2001:db8:1::5",
        "10.100.0.0",
        "10.100.0.2",
        "10.100.15.158",
        "127.0.0.1",
    ] {
        assert!(floor.contains(ip(a)), "{a} must be floor");
    }
    for a in [
        "10.8.255.255",
        "10.10.0.0",
        "192.0.2.2",
        "2001:db8:2::1",
        "10.100.0.1",
        "10.100.15.159",
        "10.100.15.160",
    ] {
        assert!(!floor.contains(ip(a)), "{a} must not be floor");
    }
    assert!(!Floor::platform().contains(ip("10.9.1.1")));
}

#[test]
fn private_ranges_and_their_disguises() {
    for a in [
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "100.64.0.1",
        "100.127.255.255",
        "100.100.100.200",
        "fc00::1",
        "fd00:ec2::254",
        "fec0::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ] {
        assert!(is_private(ip(a)), "{a} must be private");
    }
    for a in [
        "172.32.0.1",
        "172.15.255.255",
        "100.128.0.1",
        "100.63.255.255",
        "192.169.0.1",
        "11.0.0.1",
        "8.8.8.8",
        "fe00::1",
        "2001:db8::1",
        "::ffff:8.8.8.8",
        "169.254.169.254",
    ] {
        assert!(!is_private(ip(a)), "{a} must not be private");
    }
}

// === matcher: floor and private ranges ===

#[test]
fn floor_is_denied_in_every_mode_even_under_catch_all_cidrs() {
    let policies = [
        json!({"mode": "allow-all"}),
        json!({"mode": "allow-all", "allow_cidrs": ["0.0.0.0/0", "::/0"]}),
        json!({"mode": "custom", "allow_domains": ["allowed.example"], "allow_cidrs": ["0.0.0.0/0", "::/0"]}),
        json!({"mode": "custom", "allow_cidrs": ["169.254.0.0/16", "127.0.0.0/8", "fd00:ec2::/32", "100.64.0.0/10"]}),
        json!({"mode": "deny-all"}),
    ];
    for p in policies {
        let c = compile(p.clone());
        for a in FLOOR_ADDRS {
            for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
                for name in [None, Some("allowed.example"), Some(*a)] {
                    assert_eq!(
                        c.decide(name, ip(a), 443, proto),
                        deny(DenyReason::Floor),
                        "{p} {a} {proto:?} {name:?}"
                    );
                }
            }
            assert_eq!(
                c.check_resolved(ip(a)),
                Err(DenyReason::Floor),
                "{p} resolved {a}"
            );
        }
    }
}

#[test]
fn private_ranges_need_a_private_allow_cidrs_entry() {
    let catch_all = compile(json!({"mode": "allow-all", "allow_cidrs": ["0.0.0.0/0", "::/0"]}));
    let custom_catch_all = compile(json!({"mode": "custom", "allow_cidrs": ["0.0.0.0/0", "::/0"]}));
    let bare = compile(json!({"mode": "allow-all"}));
    for a in [
        "10.0.0.1",
        "172.16.5.5",
        "192.168.1.1",
        "100.64.0.1",
        "fd12::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
    ] {
        for c in [&catch_all, &custom_catch_all, &bare] {
            assert_eq!(
                c.decide(None, ip(a), 80, Proto::Tcp),
                deny(DenyReason::PrivateRange),
                "{a}"
            );
            assert_eq!(
                c.decide(None, ip(a), 53, Proto::Udp),
                deny(DenyReason::PrivateRange),
                "{a}"
            );
            assert_eq!(
                c.check_resolved(ip(a)),
                Err(DenyReason::PrivateRange),
                "{a}"
            );
        }
    }
    // Public addresses pass the catch-all.
    assert_eq!(
        custom_catch_all.decide(None, ip(PUBLIC), 22, Proto::Tcp),
        tunnel_addr(PUBLIC)
    );
    assert_eq!(
        custom_catch_all.decide(None, ip("2606:4700::1"), 22, Proto::Tcp),
        tunnel_addr("2606:4700::1")
    );

    let granted = compile(
        json!({"mode": "allow-all", "allow_cidrs": ["10.0.0.0/8", "192.168.1.5", "fd12::/16"]}),
    );
    let custom = compile(
        json!({"mode": "custom", "allow_cidrs": ["10.0.0.0/8", "192.168.1.5", "fd12::/16"]}),
    );
    for c in [&granted, &custom] {
        assert_eq!(
            c.decide(None, ip("10.1.2.3"), 5432, Proto::Tcp),
            tunnel_addr("10.1.2.3")
        );
        assert_eq!(
            c.decide(None, ip("::ffff:10.1.2.3"), 5432, Proto::Tcp),
            tunnel_addr("10.1.2.3")
        );
        assert_eq!(
            c.decide(None, ip("192.168.1.5"), 53, Proto::Udp),
            Verdict::Allow
        );
        assert_eq!(
            c.decide(None, ip("fd12::9"), 0, Proto::Icmp),
            Verdict::Allow
        );
        assert_eq!(c.check_resolved(ip("10.1.2.3")), Ok(()));
        assert_eq!(
            c.check_resolved(ip("192.168.1.6")),
            Err(DenyReason::PrivateRange)
        );
        // Only the IPv4-mapped disguise is looked up as IPv4.
        assert!(c
            .decide(None, ip("64:ff9b::a01:203"), 80, Proto::Tcp)
            .deny_reason()
            .is_some());
        assert_eq!(
            c.check_resolved(ip("64:ff9b::a01:203")),
            Err(DenyReason::PrivateRange)
        );
    }
    assert_eq!(
        granted.decide(None, ip("64:ff9b::a01:203"), 80, Proto::Tcp),
        deny(DenyReason::PrivateRange)
    );
    assert_eq!(
        custom.decide(None, ip("64:ff9b::a01:203"), 80, Proto::Tcp),
        deny(DenyReason::NoName)
    );
    assert_eq!(
        granted.decide(None, ip("192.168.1.6"), 80, Proto::Tcp),
        deny(DenyReason::PrivateRange)
    );
}

#[test]
fn resolved_public_addresses_pass_for_name_matched_connections() {
    for p in [
        json!({"mode": "custom", "allow_domains": ["a.example.com"]}),
        json!({"mode": "allow-all"}),
    ] {
        let c = compile(p.clone());
        assert_eq!(c.check_resolved(ip(PUBLIC)), Ok(()), "{p}");
        assert_eq!(c.check_resolved(ip("2606:4700::1")), Ok(()), "{p}");
        assert_eq!(
            c.check_resolved(ip("::ffff:169.254.169.254")),
            Err(DenyReason::Floor),
            "{p}"
        );
    }
    let c = compile(json!({"mode": "deny-all"}));
    assert_eq!(c.check_resolved(ip(PUBLIC)), Err(DenyReason::DenyAll));
}

// === matcher: modes ===

#[test]
fn allow_all_mode() {
    let c = compile(
        json!({"mode": "allow-all", "transforms": [{"domain": "api.example.com", "inject_headers": {"Authorization": "k"}}]}),
    );
    let cases: &[(Option<&str>, &str, u16, Proto, Verdict)] = &[
        (None, PUBLIC, 443, Proto::Tcp, tunnel_addr(PUBLIC)),
        (None, PUBLIC, 22, Proto::Tcp, tunnel_addr(PUBLIC)),
        (
            None,
            "2606:4700::1",
            443,
            Proto::Tcp,
            tunnel_addr("2606:4700::1"),
        ),
        (None, PUBLIC, 53, Proto::Udp, Verdict::Allow),
        (None, PUBLIC, 443, Proto::Udp, Verdict::Allow),
        (None, PUBLIC, 0, Proto::Icmp, Verdict::Allow),
        (
            Some("www.example.org"),
            CANARY,
            443,
            Proto::Tcp,
            tunnel_name("www.example.org"),
        ),
        (
            Some("WWW.Example.ORG."),
            CANARY,
            8443,
            Proto::Tcp,
            tunnel_name("www.example.org"),
        ),
        (
            Some("www.example.org"),
            "10.0.0.1",
            443,
            Proto::Tcp,
            tunnel_name("www.example.org"),
        ),
        (
            Some("www.example.org"),
            PUBLIC,
            443,
            Proto::Udp,
            deny(DenyReason::Quic),
        ),
        (
            Some("a..b"),
            PUBLIC,
            443,
            Proto::Tcp,
            deny(DenyReason::InvalidName),
        ),
        (
            Some("8.8.8.8"),
            PUBLIC,
            443,
            Proto::Tcp,
            tunnel_addr(PUBLIC),
        ),
        (
            None,
            "10.0.0.1",
            443,
            Proto::Tcp,
            deny(DenyReason::PrivateRange),
        ),
        (
            None,
            "100.64.1.1",
            0,
            Proto::Icmp,
            deny(DenyReason::PrivateRange),
        ),
    ];
    for (name, dst, port, proto, want) in cases {
        assert_eq!(
            &c.decide(*name, ip(dst), *port, *proto),
            want,
            "{name:?} {dst}:{port} {proto:?}"
        );
    }
    // Transforms still apply.
    let v = c.decide(Some("API.example.com"), ip(PUBLIC), 443, Proto::Tcp);
    assert_eq!(
        intercepted(&v),
        Some(("api.example.com", "api.example.com"))
    );
    assert!(c.name_allowed("anything.example") && c.name_allowed("api.example.com"));
}

#[test]
fn deny_all_mode() {
    let c = compile(json!({"mode": "deny-all"}));
    for (name, dst, proto) in [
        (None, PUBLIC, Proto::Tcp),
        (Some("www.example.org"), PUBLIC, Proto::Tcp),
        (None, "10.0.0.1", Proto::Tcp),
        (None, PUBLIC, Proto::Udp),
        (None, "8.8.8.8", Proto::Udp),
        (None, PUBLIC, Proto::Icmp),
        (Some("a..b"), PUBLIC, Proto::Tcp),
    ] {
        assert_eq!(
            c.decide(name, ip(dst), 53, proto),
            deny(DenyReason::DenyAll),
            "{name:?} {dst} {proto:?}"
        );
    }
    assert!(!c.name_allowed("www.example.org"));
}

fn custom() -> CompiledPolicy {
    compile(json!({
        "mode": "custom",
        "allow_domains": ["allowed.example", "*.example.com", "bücher.example"],
        "allow_cidrs": ["203.0.113.0/24", "10.5.0.0/16"],
        "transforms": [{"domain": "api.partner.example", "inject_headers": {"Authorization": "Bearer k"}}],
    }))
}

#[test]
fn custom_mode() {
    let c = custom();
    let cases: &[(Option<&str>, &str, u16, Proto, Verdict)] = &[
        // Name-matched: dial the name, whatever the destination (THREATS #3, tests 2).
        (
            Some("allowed.example"),
            PUBLIC,
            443,
            Proto::Tcp,
            tunnel_name("allowed.example"),
        ),
        (
            Some("allowed.example"),
            CANARY,
            443,
            Proto::Tcp,
            tunnel_name("allowed.example"),
        ),
        (
            Some("allowed.example"),
            "10.0.0.1",
            443,
            Proto::Tcp,
            tunnel_name("allowed.example"),
        ),
        (
            Some("allowed.example"),
            "203.0.113.5",
            443,
            Proto::Tcp,
            tunnel_name("allowed.example"),
        ),
        // TLS with an allowed SNI on another port (THREATS #13).
        (
            Some("allowed.example"),
            PUBLIC,
            8443,
            Proto::Tcp,
            tunnel_name("allowed.example"),
        ),
        // Not allowed by name: the destination may still be in allow_cidrs.
        (
            Some("evil.example"),
            PUBLIC,
            443,
            Proto::Tcp,
            deny(DenyReason::DomainNotAllowed),
        ),
        (
            Some("evil.example"),
            "203.0.113.5",
            443,
            Proto::Tcp,
            tunnel_addr("203.0.113.5"),
        ),
        // No name / IP literal as SNI (THREATS #4, #13).
        (None, PUBLIC, 22, Proto::Tcp, deny(DenyReason::NoName)),
        (None, PUBLIC, 25, Proto::Tcp, deny(DenyReason::NoName)),
        (
            Some("93.184.215.14"),
            PUBLIC,
            443,
            Proto::Tcp,
            deny(DenyReason::NoName),
        ),
        (
            Some("[2001:db8::1]"),
            "2606:4700::1",
            443,
            Proto::Tcp,
            deny(DenyReason::NoName),
        ),
        (
            None,
            "203.0.113.5",
            22,
            Proto::Tcp,
            tunnel_addr("203.0.113.5"),
        ),
        (
            Some("203.0.113.5"),
            "203.0.113.5",
            443,
            Proto::Tcp,
            tunnel_addr("203.0.113.5"),
        ),
        (None, "10.5.1.1", 5432, Proto::Tcp, tunnel_addr("10.5.1.1")),
        (None, "10.6.1.1", 5432, Proto::Tcp, deny(DenyReason::NoName)),
        // UDP and ICMP only to allow_cidrs.
        (
            None,
            PUBLIC,
            53,
            Proto::Udp,
            deny(DenyReason::UdpNotAllowed),
        ),
        (
            None,
            "8.8.8.8",
            53,
            Proto::Udp,
            deny(DenyReason::UdpNotAllowed),
        ),
        (None, "203.0.113.5", 53, Proto::Udp, Verdict::Allow),
        (
            None,
            PUBLIC,
            0,
            Proto::Icmp,
            deny(DenyReason::IcmpNotAllowed),
        ),
        (None, "203.0.113.5", 0, Proto::Icmp, Verdict::Allow),
        (
            Some("allowed.example"),
            PUBLIC,
            53,
            Proto::Udp,
            deny(DenyReason::UdpNotAllowed),
        ),
        // QUIC to a domain, even an allowed one at an allowed address (THREATS #14).
        (
            Some("allowed.example"),
            PUBLIC,
            443,
            Proto::Udp,
            deny(DenyReason::Quic),
        ),
        (
            Some("allowed.example"),
            "203.0.113.5",
            443,
            Proto::Udp,
            deny(DenyReason::Quic),
        ),
        (None, "203.0.113.5", 443, Proto::Udp, Verdict::Allow),
    ];
    for (name, dst, port, proto, want) in cases {
        assert_eq!(
            &c.decide(*name, ip(dst), *port, *proto),
            want,
            "{name:?} {dst}:{port} {proto:?}"
        );
    }
}

#[test]
fn transform_domains_are_implicitly_allowed_and_intercepted() {
    let c = custom();
    let v = c.decide(Some("api.partner.example"), ip(PUBLIC), 443, Proto::Tcp);
    let Verdict::Intercept { name, transform } = v else {
        panic!("expected Intercept, got {v:?}");
    };
    assert_eq!(name, "api.partner.example");
    assert_eq!(
        transform
            .inject_headers
            .get("Authorization")
            .map(String::as_str),
        Some("Bearer k")
    );
    assert!(c.name_allowed("api.partner.example"));
    assert!(c.name_allowed("API.Partner.Example."));
    assert!(!c.name_allowed("partner.example"));
    // A transform on a domain that is also in allow_domains still intercepts.
    let both = compile(
        json!({"mode": "custom", "allow_domains": ["*.example.com"], "transforms": [{"domain": "api.example.com"}]}),
    );
    let v = both.decide(Some("api.example.com"), ip(PUBLIC), 443, Proto::Tcp);
    assert_eq!(
        intercepted(&v),
        Some(("api.example.com", "api.example.com"))
    );
    assert_eq!(
        both.decide(Some("www.example.com"), ip(PUBLIC), 443, Proto::Tcp),
        tunnel_name("www.example.com")
    );
    // UDP to a transform domain is not intercepted.
    assert_eq!(
        c.decide(Some("api.partner.example"), ip(PUBLIC), 443, Proto::Udp),
        deny(DenyReason::Quic)
    );
}

#[test]
fn most_specific_transform_wins() {
    let rules = [
        json!({"domain": "*.example.com", "inject_headers": {"X-Rule": "wide"}}),
        json!({"domain": "*.api.example.com", "inject_headers": {"X-Rule": "narrow"}}),
        json!({"domain": "v1.api.example.com", "inject_headers": {"X-Rule": "exact"}}),
    ];
    let expected: &[(&str, Option<&str>)] = &[
        ("x.example.com", Some("*.example.com")),
        ("api.example.com", Some("*.example.com")),
        ("x.api.example.com", Some("*.api.example.com")),
        ("a.b.api.example.com", Some("*.api.example.com")),
        ("v1.api.example.com", Some("v1.api.example.com")),
        ("a.v1.api.example.com", Some("*.api.example.com")),
        ("V1.API.EXAMPLE.COM.", Some("v1.api.example.com")),
        ("example.com", None),
        ("api.example.com.evil.net", None),
    ];
    let forward = json!({"mode": "custom", "transforms": rules.to_vec()});
    let reverse =
        json!({"mode": "custom", "transforms": rules.iter().rev().cloned().collect::<Vec<_>>()});
    for p in [forward, reverse] {
        let c = compile(p);
        for (name, want) in expected {
            let v = c.decide(Some(name), ip(PUBLIC), 443, Proto::Tcp);
            assert_eq!(intercepted(&v).map(|(_, d)| d), *want, "{name}");
            assert_eq!(
                c.transform_for(name).map(|t| t.domain.clone()).as_deref(),
                *want,
                "{name}"
            );
            if want.is_none() {
                assert_eq!(v, deny(DenyReason::DomainNotAllowed), "{name}");
            }
        }
    }
}

// === matcher: wildcard table (THREATS #7, tests 13) ===

#[test]
fn wildcard_table_against_validator_and_matcher() {
    // The validator side of the table.
    for (raw, valid) in [
        ("*.example.com", true),
        ("*", false),
        ("*.com", false),
        ("a.*.example.com", false),
        ("*example.com", false),
        ("ex*ample.com", false),
    ] {
        assert_eq!(Pattern::parse(raw).is_ok(), valid, "{raw}");
    }
    let c = compile(
        json!({"mode": "custom", "allow_domains": ["*.example.com", "exact.example.org", "bücher.example"]}),
    );
    let table: &[(&str, Option<&str>)] = &[
        ("a.example.com", Some("a.example.com")),
        ("a.b.example.com", Some("a.b.example.com")),
        ("a.b.c.d.example.com", Some("a.b.c.d.example.com")),
        ("A.EXAMPLE.COM.", Some("a.example.com")),
        (
            "xn--bcher-kva.example.com",
            Some("xn--bcher-kva.example.com"),
        ),
        ("_svc._tcp.example.com", Some("_svc._tcp.example.com")),
        ("example.com", None),
        ("EXAMPLE.COM.", None),
        ("example.com.evil.net", None),
        ("a.example.com.evil.net", None),
        ("evilexample.com", None),
        ("a.evilexample.com", None),
        ("example.co", None),
        ("a.example.co", None),
        ("xn--xample-2of.com", None),
        ("a.xn--xample-2of.com", None),
        ("exact.example.org", Some("exact.example.org")),
        ("EXACT.EXAMPLE.ORG.", Some("exact.example.org")),
        ("a.exact.example.org", None),
        ("example.org", None),
        ("exact.example.org.evil.net", None),
        ("xn--bcher-kva.example", Some("xn--bcher-kva.example")),
        ("XN--BCHER-KVA.EXAMPLE.", Some("xn--bcher-kva.example")),
        ("a.xn--bcher-kva.example", None),
    ];
    for (name, want) in table {
        let v = c.decide(Some(name), ip(PUBLIC), 443, Proto::Tcp);
        match want {
            Some(n) => assert_eq!(v, tunnel_name(n), "{name}"),
            None => assert_eq!(v, deny(DenyReason::DomainNotAllowed), "{name}"),
        }
        assert_eq!(c.name_allowed(name), want.is_some(), "name_allowed({name})");
    }
}

#[test]
fn malformed_names_are_denied_never_decided_by_address() {
    // allow_cidrs covers every public destination, so a fall-back would allow.
    let c = compile(
        json!({"mode": "custom", "allow_domains": ["*.example.com"], "allow_cidrs": ["0.0.0.0/0", "::/0"]}),
    );
    let a = compile(json!({"mode": "allow-all"}));
    let l64 = format!("{}.example.com", "a".repeat(64));
    let n254 = format!("{}.example.com", "a.".repeat(121));
    let names: Vec<&str> = vec![
        "a\0.example.com",
        "a..example.com",
        ".example.com",
        "*",
        "*.example.com",
        &l64,
        &n254,
        "bücher.example.com",
        "a\u{3002}example.com",
        "a.example.com:443",
        "2130706433",
        "127.1",
        "0x7f.0.0.1",
        "",
        ".",
        "a example.com",
        "a/b.example.com",
        "a.example.com\r\n",
        "[not-an-ip]",
        "xn--a.example.com",
    ];
    assert_eq!(n254.len(), 254);
    for name in names {
        for p in [&c, &a] {
            assert_eq!(
                p.decide(Some(name), ip(PUBLIC), 443, Proto::Tcp),
                deny(DenyReason::InvalidName),
                "{name:?}"
            );
        }
        assert!(!c.name_allowed(name), "{name:?}");
    }
    // IP literals are not malformed: they count as no name.
    for (name, dst) in [
        ("1.2.3.4", PUBLIC),
        ("::1", "2606:4700::1"),
        ("[2001:db8::1]", "2606:4700::1"),
        ("169.254.169.254", PUBLIC),
    ] {
        assert_eq!(
            c.decide(Some(name), ip(dst), 443, Proto::Tcp),
            tunnel_addr(dst),
            "{name}"
        );
    }
}

#[test]
fn wire_names_normalise_like_patterns() {
    let cases: &[(&str, Result<Host, NameError>)] = &[
        ("Example.COM.", Ok(Host::Name("example.com".into()))),
        (
            "XN--BCHER-KVA.example",
            Ok(Host::Name("xn--bcher-kva.example".into())),
        ),
        (
            "_dmarc.example.com",
            Ok(Host::Name("_dmarc.example.com".into())),
        ),
        ("1.2.3.4", Ok(Host::Ip(ip("1.2.3.4")))),
        ("1.2.3.4.", Ok(Host::Ip(ip("1.2.3.4")))),
        ("[::1]", Ok(Host::Ip(ip("::1")))),
        ("bücher.example", Err(NameError::NonAscii)),
        ("example\u{3002}com", Err(NameError::NonAscii)),
        ("a.com:443", Err(NameError::Port)),
        ("*.example.com", Err(NameError::MidWildcard)),
    ];
    for (raw, want) in cases {
        assert_eq!(&parse_host(raw, Side::Wire), want, "{raw:?}");
    }
}

// === matcher: robustness ===

#[test]
fn unvalidated_policies_compile_fail_closed() {
    let p = NetworkPolicy {
        mode: Mode::Custom,
        allow_domains: vec![
            "*".into(),
            "a..b".into(),
            "*.com".into(),
            "ok.example".into(),
        ],
        allow_cidrs: vec!["nope".into(), "10.1.2.3/8".into(), "0.0.0.0/0 ".into()],
        transforms: vec![Transform {
            domain: "*".into(),
            inject_headers: Default::default(),
            strip_headers: vec![],
        }],
    };
    let c = CompiledPolicy::new(&p, Arc::new(Floor::platform()));
    assert_eq!(
        c.decide(Some("x.com"), ip(PUBLIC), 443, Proto::Tcp),
        deny(DenyReason::DomainNotAllowed)
    );
    assert_eq!(
        c.decide(None, ip("10.0.0.1"), 443, Proto::Tcp),
        deny(DenyReason::NoName)
    );
    assert_eq!(
        c.decide(None, ip(PUBLIC), 443, Proto::Tcp),
        deny(DenyReason::NoName)
    );
    assert_eq!(
        c.decide(Some("ok.example"), ip(PUBLIC), 443, Proto::Tcp),
        tunnel_name("ok.example")
    );
}

#[test]
fn deny_reason_codes_are_stable() {
    let codes: Vec<&str> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        codes,
        [
            "floor",
            "private_range",
            "deny_all",
            "domain_not_allowed",
            "no_name",
            "udp_not_allowed",
            "icmp_not_allowed",
            "quic",
            "invalid_name",
        ]
    );
    assert_eq!(DenyReason::Quic.to_string(), "quic");
    assert_eq!(
        deny(DenyReason::Floor).deny_reason(),
        Some(DenyReason::Floor)
    );
    assert_eq!(Verdict::Allow.deny_reason(), None);
}

/// A small deterministic fuzz: odd strings never panic, and whatever is
/// accepted is a fixed point of normalisation.
#[test]
fn odd_inputs_never_panic_and_normalisation_is_idempotent() {
    let alphabet: Vec<char> = "aZ09-._*:[]%@/\\ \0\r\n\t.xn--ü。．＊ﬀ\u{200d}\u{ad}\u{fffd}1x"
        .chars()
        .collect();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let c = custom();
    for _ in 0..20_000 {
        let len = (next() % 24) as usize;
        let s: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        if let Ok(p) = Pattern::parse(&s) {
            let text = p.text();
            assert_eq!(
                Pattern::parse(&text).map(|p| p.text()),
                Ok(text.clone()),
                "{s:?}"
            );
        }
        if let Ok(Host::Name(n)) = parse_host(&s, Side::Wire) {
            assert_eq!(
                parse_host(&n, Side::Wire),
                Ok(Host::Name(n.clone())),
                "{s:?}"
            );
        }
        let _ = c.decide(Some(&s), ip(PUBLIC), 443, Proto::Tcp);
        let _ = c.name_allowed(&s);
        let _ = NetworkPolicy::from_json(
            &json!({"mode": "custom", "allow_domains": [s], "allow_cidrs": [s], "transforms": [{"domain": s, "inject_headers": {s.clone(): s}, "strip_headers": [s]}]}),
            P,
        );
    }
}

#[test]
fn pattern_labels_neither_start_nor_end_with_a_hyphen_and_a_labels_decode() {
    let cases: Vec<(&str, Result<(), NameError>)> = vec![
        ("-bad.example.com", Err(NameError::EdgeHyphen)),
        ("bad-.example.com", Err(NameError::EdgeHyphen)),
        ("a.-b.example.com", Err(NameError::EdgeHyphen)),
        ("*.-bad.example.com", Err(NameError::EdgeHyphen)),
        ("example.com-", Err(NameError::EdgeHyphen)),
        ("good-name.example.com", Ok(())),
        ("a--b.example.com", Ok(())),
        // A-labels must decode; a well-formed one is accepted.
        ("xn--.example.com", Err(NameError::Idna)),
        ("xn--a.com", Err(NameError::Idna)),
        ("xn--99999999999.com", Err(NameError::Idna)),
        ("xn--bcher-kva.example", Ok(())),
    ];
    for (raw, want) in cases {
        let got = Pattern::parse(raw).map(|_| ());
        assert_eq!(got, want, "pattern {raw:?}");
    }
    let e = errs(json!({"mode": "custom", "allow_domains": ["ok.com", "-bad.example.com"]}));
    assert_eq!(fields(&e), ["network_policy.allow_domains[1]"]);
    assert!(e[0].error.contains("hyphen"), "{}", e[0].error);
}
