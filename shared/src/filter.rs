//! The decision "copy, delete, record or leave": pure functions of the rule, the event and
//! what the source holds for the event's key *now*.
//!
//! An event only says which key changed. What is done is decided by the source's current
//! state, never by the event's action: present -> copy that state; absent -> delete the
//! target object under `full`, leave it under `write` (a delete event is then recorded as
//! a suppressed delete). The same rule serves the first try and every re-apply after a
//! lost ledger race, and it is what makes versioned buckets converge: deleting the
//! current version, or a delete marker, makes an older version current again, and S3
//! sends only an `ObjectRemoved` event for it.

use crate::event::{EventKind, ReplicationEvent};
use crate::rule::{Policy, Rule};

/// Why an event leads to no change in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The key is outside the rule's prefixes.
    OutsidePrefixes,
    /// No rule replicates the event's bucket.
    NoRule,
    /// Older than an event already applied for the key (by sequencer).
    Stale,
    /// The very event already applied (same sequencer and ETag).
    Duplicate,
    /// The suppressed delete this event stands for was recorded before (a redelivery).
    SuppressedBefore,
    /// The source object is a replica crr wrote from another bucket: replicating it would
    /// loop between two deployments replicating into each other.
    ReplicaOfOther,
    /// The source holds nothing under the key and the policy (`write`) keeps the target.
    SourceAbsent,
}

impl Skip {
    /// Name used in logs, metrics and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OutsidePrefixes => "outside_prefixes",
            Skip::NoRule => "no_rule",
            Skip::Stale => "stale",
            Skip::Duplicate => "duplicate",
            Skip::SuppressedBefore => "suppressed_before",
            Skip::ReplicaOfOther => "replica_loop",
            Skip::SourceAbsent => "source_absent",
        }
    }

    /// True for events that repeat or precede what was already applied (counted as
    /// "skipped stale" in the status).
    pub fn is_stale(self) -> bool {
        matches!(self, Skip::Stale | Skip::Duplicate | Skip::SuppressedBefore)
    }
}

/// What the source holds for a key right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState<'a> {
    /// No current object (never written, deleted, or a delete marker is current).
    Absent,
    /// An object of the user's (or one restored from this rule's own target: failback).
    Present,
    /// A replica crr wrote of an object of this other bucket.
    ReplicaOf(&'a str),
}

/// What to do to make the target equal the source for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copy the source's current object to the target.
    Copy,
    /// Remove the object from the target (policy `full`, source absent).
    DeleteTarget,
    /// Keep the target object and record the delete as suppressed (policy `write`, a
    /// delete event, source absent).
    RecordSuppressed,
    /// Change nothing.
    Leave(Skip),
}

/// The prefix filter: `Some(skip)` when the rule does not cover the event's key.
pub fn outside_rule(rule: &Rule, event: &ReplicationEvent) -> Option<Skip> {
    (!rule.matches_key(&event.key)).then_some(Skip::OutsidePrefixes)
}

/// The convergence rule: what to do, given the policy, the kind of event that named the
/// key, and what the source holds for it now.
pub fn converge(policy: Policy, kind: EventKind, source: SourceState<'_>) -> Step {
    match (source, policy, kind) {
        (SourceState::Present, _, _) => Step::Copy,
        (SourceState::ReplicaOf(_), _, _) => Step::Leave(Skip::ReplicaOfOther),
        (SourceState::Absent, Policy::Full, _) => Step::DeleteTarget,
        (SourceState::Absent, Policy::Write, EventKind::Removed { .. }) => Step::RecordSuppressed,
        (SourceState::Absent, Policy::Write, EventKind::Created) => Step::Leave(Skip::SourceAbsent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::rule;

    const REMOVED: EventKind = EventKind::Removed {
        delete_marker: false,
    };
    const MARKER: EventKind = EventKind::Removed {
        delete_marker: true,
    };

    fn event(key: &str) -> ReplicationEvent {
        ReplicationEvent {
            bucket: "src-bucket".into(),
            key: key.into(),
            kind: EventKind::Created,
            sequencer: None,
            version_id: None,
            etag: None,
            size: None,
            event_time: None,
            event_name: "test".into(),
        }
    }

    #[test]
    fn keys_outside_the_prefixes_are_skipped() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.prefixes = vec!["docs/".into()];
        assert_eq!(outside_rule(&r, &event("docs/a")), None);
        assert_eq!(
            outside_rule(&r, &event("img/a")),
            Some(Skip::OutsidePrefixes)
        );
    }

    #[test]
    fn a_present_source_is_copied_whatever_the_event_said() {
        for policy in [Policy::Full, Policy::Write] {
            for kind in [EventKind::Created, REMOVED, MARKER] {
                // A delete event whose key exists again (re-created, or an older version
                // made current by deleting the newest) copies what is there now.
                assert_eq!(
                    converge(policy, kind, SourceState::Present),
                    Step::Copy,
                    "{policy:?} {kind:?}"
                );
            }
        }
    }

    #[test]
    fn an_absent_source_deletes_under_full_and_is_kept_under_write() {
        for kind in [EventKind::Created, REMOVED, MARKER] {
            // Under full, even a create event whose object is gone removes the target
            // (it may have been written by a copy that lost a race with the delete).
            assert_eq!(
                converge(Policy::Full, kind, SourceState::Absent),
                Step::DeleteTarget
            );
        }
        assert_eq!(
            converge(Policy::Write, REMOVED, SourceState::Absent),
            Step::RecordSuppressed
        );
        assert_eq!(
            converge(Policy::Write, MARKER, SourceState::Absent),
            Step::RecordSuppressed
        );
        assert_eq!(
            converge(Policy::Write, EventKind::Created, SourceState::Absent),
            Step::Leave(Skip::SourceAbsent)
        );
    }

    #[test]
    fn replicas_of_other_buckets_are_never_replicated_again() {
        for policy in [Policy::Full, Policy::Write] {
            assert_eq!(
                converge(policy, EventKind::Created, SourceState::ReplicaOf("b")),
                Step::Leave(Skip::ReplicaOfOther)
            );
        }
    }
}
