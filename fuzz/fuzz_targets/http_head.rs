//! The HTTP/1 request-head parser the proxy runs on plaintext connections.
//! Invariants: no panic; a parsed head lies within the input and its Host
//! is lower-case without a trailing dot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_proxy::detect;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = detect::parse_http_head(data) {
        assert!(head.head_len <= data.len());
        assert_eq!(head.host, head.host.to_ascii_lowercase());
        assert!(!head.host.ends_with('.'), "host {:?}", head.host);
        assert!(head.version <= 1);
    }
    let _ = detect::parse_http_head_limited(data, 256);
    let _ = detect::detect_bytes(data, 16_384);
});
