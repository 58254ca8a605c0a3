//! Fuzzes ClientHello reassembly and parsing. Invariants: no panic; a hello
//! is only reported when every byte it covers was present; SNI is
//! normalised; no strict prefix of the carrying records yields a hello.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_proxy::detect::{
    detect_bytes, parse_client_hello, parse_client_hello_limited, ClientHelloInfo, Detected,
};

fn check(data: &[u8]) {
    let Ok(Some(info)) = parse_client_hello(data) else {
        return;
    };
    check_info(&info, data);
    let carried = data.get(..info.wire_len).unwrap_or_default();
    assert_eq!(
        parse_client_hello(carried).ok().flatten().as_ref(),
        Some(&info)
    );
    let short = data
        .get(..info.wire_len.saturating_sub(1))
        .unwrap_or_default();
    assert!(!matches!(parse_client_hello(short), Ok(Some(_))));
    // A cap at least the wire size never changes the answer.
    assert_eq!(
        parse_client_hello_limited(carried, info.wire_len)
            .ok()
            .flatten()
            .as_ref(),
        Some(&info)
    );
    assert_eq!(
        detect_bytes(data, 16_384).ok().flatten(),
        Some(Detected::Tls(info))
    );
}

fn check_info(info: &ClientHelloInfo, data: &[u8]) {
    assert!(info.wire_len <= data.len() && info.wire_len <= 16_384);
    assert!(info.hello_len + 5 <= info.wire_len);
    assert!(!info.supported_versions.is_empty());
    if let Some(sni) = &info.sni {
        assert!(!sni.is_empty() && sni.len() <= 253, "{sni:?}");
        assert!(sni.is_ascii() && !sni.ends_with('.'), "{sni:?}");
        assert_eq!(*sni, sni.to_ascii_lowercase());
        assert!(
            !sni.contains('\0') && !sni.contains('*') && !sni.contains(".."),
            "{sni:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let _ = parse_client_hello_limited(data, 512);
    // Also as the payload of one handshake record, to reach the body parser
    // without having to discover the framing.
    if data.len() <= 16_000 {
        let mut framed = vec![22, 3, 1];
        framed.extend_from_slice(&(data.len() as u16).to_be_bytes());
        framed.extend_from_slice(data);
        check(&framed);
    }
});
