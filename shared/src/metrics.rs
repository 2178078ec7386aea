//! Metrics as CloudWatch Embedded Metric Format lines on stdout: CloudWatch Logs turns
//! them into metrics without any API call from the function.

use serde_json::json;

/// Namespace of every crr metric.
pub const NAMESPACE: &str = "crr";

/// One replicated (or failed) event: latency, bytes, and whether it failed.
pub fn event_line(
    rule_id: &str,
    outcome: &str,
    latency_ms: u64,
    bytes: u64,
    failed: bool,
) -> String {
    let timestamp = chrono::Utc::now().timestamp_millis();
    json!({
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["RuleId"]],
                "Metrics": [
                    {"Name": "EventLatency", "Unit": "Milliseconds"},
                    {"Name": "ReplicatedBytes", "Unit": "Bytes"},
                    {"Name": "FailedEvents", "Unit": "Count"}
                ]
            }]
        },
        "RuleId": rule_id,
        "Outcome": outcome,
        "EventLatency": latency_ms,
        "ReplicatedBytes": bytes,
        "FailedEvents": u64::from(failed),
    })
    .to_string()
}

/// Writes one EMF line for an event.
pub fn emit_event(rule_id: &str, outcome: &str, latency_ms: u64, bytes: u64, failed: bool) {
    println!(
        "{}",
        event_line(rule_id, outcome, latency_ms, bytes, failed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_valid_emf() {
        let v: serde_json::Value =
            serde_json::from_str(&event_line("r1", "replicated", 12, 2048, false)).unwrap();
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Namespace"], "crr");
        assert_eq!(v["RuleId"], "r1");
        assert_eq!(v["EventLatency"], 12);
        assert_eq!(v["ReplicatedBytes"], 2048);
        assert_eq!(v["FailedEvents"], 0);
    }
}
