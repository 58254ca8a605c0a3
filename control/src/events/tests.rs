use super::*;

fn ev(id: &str, port: u16) -> NetEvent {
    NetEvent {
        seq: 0,
        time_ms: 0,
        sandbox_id: id.into(),
        kind: Kind::Denied,
        protocol: "tcp".into(),
        destination: Some("169.254.169.254".parse().expect("ip")),
        port,
        name: None,
        reason: "floor".into(),
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-events-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn sequence_limit_and_after() {
    let log = EventLog::new(tmpdir("seq"));
    for p in 1..=5 {
        log.record(ev("sbx-a", p));
    }
    log.record(ev("sbx-b", 9));
    let all = log.list("sbx-a", 0, 100);
    assert_eq!(
        all.iter().map(|e| e.port).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(log.list("sbx-a", 3, 100).len(), 2);
    assert_eq!(
        log.list("sbx-a", 0, 2)
            .iter()
            .map(|e| e.port)
            .collect::<Vec<_>>(),
        [4, 5],
        "newest kept"
    );
    assert_eq!(log.list("sbx-b", 0, 100).len(), 1, "sandboxes are separate");
}

#[test]
fn survives_a_restart_and_stays_bounded() {
    let dir = tmpdir("restart");
    {
        let log = EventLog::new(dir.clone());
        for p in 0..(2 * EVENTS_PER_SANDBOX + 10) {
            log.record(ev("sbx-r", (p % 60000) as u16));
        }
    }
    let lines = std::fs::read_to_string(dir.join("sbx-r.jsonl"))
        .expect("file")
        .lines()
        .count();
    assert!(
        lines <= 2 * EVENTS_PER_SANDBOX + 1,
        "file grows without bound: {lines}"
    );
    let log = EventLog::new(dir.clone());
    let kept = log.list("sbx-r", 0, usize::MAX);
    assert_eq!(kept.len(), EVENTS_PER_SANDBOX);
    let last = kept.last().expect("events").seq;
    log.record(ev("sbx-r", 1));
    assert_eq!(
        log.list("sbx-r", last, 10)[0].seq,
        last + 1,
        "sequence continues after a restart"
    );
    log.remove("sbx-r");
    assert!(!dir.join("sbx-r.jsonl").exists());
    let _ = std::fs::remove_dir_all(dir);
}
