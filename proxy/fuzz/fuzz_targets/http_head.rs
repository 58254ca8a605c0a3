//! Fuzzes the HTTP/1 request-head parser and the classifier. Invariants: no
//! panic; a head is only reported when its CRLFCRLF was present; the host is
//! normalised; re-parsing just the head gives the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_proxy::detect::{detect_bytes, parse_http_head, parse_http_head_limited};

fuzz_target!(|data: &[u8]| {
    let _ = detect_bytes(data, 16_384);
    let _ = parse_http_head_limited(data, 256);
    let Ok(Some(head)) = parse_http_head(data) else {
        return;
    };
    let bytes = data.get(..head.head_len).unwrap_or_default();
    assert!(bytes.ends_with(b"\r\n\r\n"));
    assert!(!bytes.contains(&0));
    assert!(head.version <= 1);
    let host = &head.host;
    assert!(
        !host.is_empty() && host.is_ascii() && !host.ends_with('.'),
        "{host:?}"
    );
    assert_eq!(*host, host.to_ascii_lowercase());
    assert!(!host.contains('@') && !host.contains('['), "{host:?}");
    assert_ne!(head.port, Some(0));
    assert_eq!(parse_http_head(bytes).ok().flatten().as_ref(), Some(&head));
});
