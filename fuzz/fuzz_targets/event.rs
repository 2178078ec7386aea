//! Any bytes as an SQS message body, a Lambda payload and an encoded key: the event
//! parsers must answer Ok or a MalformedEvent, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crr_shared::event::parse_message_body(text);
    if let Ok(payload) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = crr_shared::event::parse_invocation(&payload);
    }
    let _ = crr_shared::event::decode_key(text);
});
