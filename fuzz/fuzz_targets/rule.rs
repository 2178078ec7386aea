//! Any bytes as a stored rule (JSON): parsing and validation must answer, never panic,
//! and what validates must be usable by the filters.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rule) = serde_json::from_slice::<crr_shared::rule::Rule>(data) else {
        return;
    };
    if rule.validate().is_ok() {
        let _ = rule.listing_prefixes();
        let _ = rule.resolved_copy_mode();
        for key in ["a", "photos/2026/x.jpg", "logs/"] {
            let _ = rule.matches_key(key);
        }
    }
});
