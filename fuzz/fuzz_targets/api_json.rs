//! What the API does with a request body: JSON, then the collecting
//! validators of every body it accepts (create, resume, restore, snapshot,
//! exec, policy update). Invariants: no panic; an accepted policy
//! serialises and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::validate::{
    parse_policy_update, CreateRequest, ExecRequestBody, RestoreRequest, SnapshotRequest,
};
use tollgate_proxy::policy::NetworkPolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = CreateRequest::parse(&v);
    let _ = RestoreRequest::parse_resume(&v);
    let _ = RestoreRequest::parse_restore(&v);
    let _ = SnapshotRequest::parse(&v);
    let _ = ExecRequestBody::parse(&v);
    if let Ok(p) = parse_policy_update(&v) {
        let again = serde_json::to_value(&p).expect("serialise");
        let back = NetworkPolicy::from_json(&again, "network_policy").expect("round trip");
        assert_eq!(back, p);
    }
});
