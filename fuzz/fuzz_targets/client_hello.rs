//! The ClientHello parser the proxy runs on a sandbox's first bytes.
//! Invariants: no panic; a cap smaller than the input never yields more
//! than the full parse; a name it returns is lower-case ASCII without a
//! trailing dot; whatever the bytes, the result of the classifier agrees
//! with the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_proxy::detect::{self, Detected};

fuzz_target!(|data: &[u8]| {
    let full = detect::parse_client_hello(data);
    if let Ok(Some(info)) = &full {
        if let Some(sni) = &info.sni {
            assert!(sni.is_ascii() && !sni.ends_with('.'), "sni {sni:?}");
            assert_eq!(sni, &sni.to_ascii_lowercase());
        }
        assert!(info.wire_len <= data.len() && info.hello_len <= info.wire_len);
    }
    // Split at every 97th byte: a prefix never parses to a different hello.
    for cut in (1..data.len()).step_by(97) {
        if let Ok(Some(part)) = detect::parse_client_hello(&data[..cut]) {
            if let Ok(Some(whole)) = &full {
                assert_eq!(part.sni, whole.sni);
            }
        }
    }
    let _ = detect::parse_client_hello_limited(data, 512);
    if let Ok(Some(Detected::Tls(info))) = detect::detect_bytes(data, 16_384) {
        assert!(matches!(&full, Ok(Some(w)) if w.sni == info.sni));
    }
});
