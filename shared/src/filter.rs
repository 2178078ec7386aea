//! The decision "copy, delete or skip this event": a pure function of the rule and the event.

use crate::event::{EventKind, ReplicationEvent};
use crate::rule::{Policy, Rule};

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Copy the source's current object to the target.
    Copy,
    /// Remove the object from the target.
    Delete,
    /// Do nothing, for the reason given.
    Skip(SkipReason),
}

/// Why an event leads to no change in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The key is outside the rule's prefixes.
    OutsidePrefixes,
    /// A delete under the `write` policy: recorded as a suppressed delete.
    SuppressedDelete,
}

impl SkipReason {
    /// Name used in logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::OutsidePrefixes => "outside_prefixes",
            SkipReason::SuppressedDelete => "suppressed_delete",
        }
    }
}

/// Applies the prefix filter and the policy.
pub fn decide(rule: &Rule, event: &ReplicationEvent) -> Action {
    if !rule.matches_key(&event.key) {
        return Action::Skip(SkipReason::OutsidePrefixes);
    }
    match (event.kind, rule.policy) {
        (EventKind::Created, _) => Action::Copy,
        (EventKind::Removed { .. }, Policy::Full) => Action::Delete,
        (EventKind::Removed { .. }, Policy::Write) => Action::Skip(SkipReason::SuppressedDelete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::rule;

    fn event(key: &str, kind: EventKind) -> ReplicationEvent {
        ReplicationEvent {
            bucket: "src-bucket".into(),
            key: key.into(),
            kind,
            sequencer: None,
            version_id: None,
            etag: None,
            size: None,
            event_time: None,
            event_name: "test".into(),
        }
    }

    #[test]
    fn full_policy_copies_and_deletes_inside_prefixes() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.prefixes = vec!["docs/".into()];
        assert_eq!(
            decide(&r, &event("docs/a", EventKind::Created)),
            Action::Copy
        );
        let removed = EventKind::Removed {
            delete_marker: true,
        };
        assert_eq!(decide(&r, &event("docs/a", removed)), Action::Delete);
        assert_eq!(
            decide(&r, &event("img/a", EventKind::Created)),
            Action::Skip(SkipReason::OutsidePrefixes)
        );
    }

    #[test]
    fn write_policy_suppresses_deletes() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.policy = Policy::Write;
        assert_eq!(decide(&r, &event("a", EventKind::Created)), Action::Copy);
        let removed = EventKind::Removed {
            delete_marker: false,
        };
        assert_eq!(
            decide(&r, &event("a", removed)),
            Action::Skip(SkipReason::SuppressedDelete)
        );
    }
}
