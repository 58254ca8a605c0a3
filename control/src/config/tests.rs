use super::*;

#[test]
fn embedded_default_needs_no_file() {
    let c = Config::default();
    c.check().expect("the default config is valid");
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/tollgate"));
    assert_eq!(c.templates()[0].name, DEFAULT_TEMPLATE);
}

#[test]
fn file_adds_orgs_and_rejects_unknown_fields() {
    let c: Config = toml::from_str(
        r#"
        [[organizations]]
        name = "acme"
        api_keys = ["0123456789abcdef"]
        [host]
        vcpu = 4
        "#,
    )
    .expect("parse");
    c.check().expect("valid");
    assert_eq!(c.organizations[0].max_sandboxes, 3, "default org limit");
    assert_eq!(c.host.vcpu, 4);
    assert_eq!(
        c.host.memory_mib,
        HostConfig::default().memory_mib,
        "unset fields keep defaults"
    );
    assert!(
        toml::from_str::<Config>("lisen = \"0.0.0.0:1\"").is_err(),
        "typo accepted"
    );
    assert!(
        toml::from_str::<Config>("[host]\ncpus = 4").is_err(),
        "typo in a table accepted"
    );
}

#[test]
fn check_rejects_configs_that_cannot_work() {
    let org = |name: &str, key: &str| OrgConfig {
        name: name.into(),
        api_keys: vec![key.into()],
        max_sandboxes: 3,
    };
    let mut c = Config {
        organizations: vec![org("a", "short")],
        ..Config::default()
    };
    assert!(c.check().is_err(), "short key");
    c.organizations = vec![org("a", "0123456789abcdef"), org("b", "0123456789abcdef")];
    assert!(c.check().is_err(), "shared key");
    c.organizations = vec![org("a", "0123456789abcdef"), org("a", "fedcba9876543210")];
    assert!(c.check().is_err(), "duplicate org");
    let c = Config {
        templates: vec![TemplateConfig {
            name: "t".into(),
            command: vec![],
            env: BTreeMap::new(),
        }],
        ..Config::default()
    };
    assert!(c.check().is_err(), "empty command");
}

#[test]
fn proxy_upstream_ca_file_is_optional() {
    assert_eq!(Config::default().proxy.upstream_ca_file, None);
    let c: Config = toml::from_str("[proxy]\nupstream_ca_file = \"/etc/tollgate/upstream-ca.pem\"")
        .expect("parse");
    assert_eq!(
        c.proxy.upstream_ca_file,
        Some(PathBuf::from("/etc/tollgate/upstream-ca.pem"))
    );
    assert_eq!(
        c.proxy.max_connections, 1024,
        "other proxy fields keep defaults"
    );
    assert!(
        toml::from_str::<Config>("[proxy]\nupstream_ca = \"/x\"").is_err(),
        "typo accepted"
    );
}

#[test]
fn the_default_organization_may_be_listed_without_keys_to_raise_its_limit() {
    let c: Config =
        toml::from_str("[[organizations]]\nname = \"default\"\napi_keys = []\nmax_sandboxes = 50")
            .expect("parse");
    assert!(c.check().is_ok());
    let c: Config =
        toml::from_str("[[organizations]]\nname = \"team\"\napi_keys = []").expect("parse");
    assert!(c.check().is_err(), "another organization needs a key");
}
