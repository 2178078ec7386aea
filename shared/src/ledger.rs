//! The per-key ledger: for each rule and key, the newest event applied to the target.
//! It is what makes replication idempotent and ordered: S3 delivers events at least once
//! and out of order, and per key the newest event wins.
//!
//! Commits are optimistic: an event reads the entry (with its `version`), applies the
//! source's current state to the target, then commits only if the entry is still at that
//! version. A failed commit means another event for the key committed in between, and
//! its write and ours may have landed in either order; the loser re-applies the source's
//! current state and tries again, so the last write to the target is always one made
//! after the newest change was visible.

use serde::{Deserialize, Serialize};

/// Width sequencers are padded to. S3's are 16-20 hex digits today.
const SEQUENCER_WIDTH: usize = 64;

/// Days a ledger entry lives: past SQS's longest retention (14 days), so a redelivered or
/// redriven event always finds the entry of anything newer.
pub const LEDGER_TTL_DAYS: i64 = 15;

/// The last event applied for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Normalized sequencer (see [`normalize_sequencer`]).
    pub sequencer: String,
    /// ETag the event announced, or a removal marker, to tell a true duplicate from a
    /// different event carrying the same sequencer.
    pub etag: String,
    /// Bumped by every commit; the optimistic-concurrency token.
    pub version: u64,
}

/// Makes sequencers comparable as plain strings: upper-case hex, right-padded with zeros
/// to one width (S3: "right-pad the shorter one with zeros, then compare").
pub fn normalize_sequencer(seq: &str) -> Option<String> {
    let seq = seq.trim();
    if seq.is_empty() || seq.len() > SEQUENCER_WIDTH || !seq.chars().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    let mut s = seq.to_ascii_uppercase();
    s.extend(std::iter::repeat_n('0', SEQUENCER_WIDTH - s.len()));
    Some(s)
}

/// What an application commits to the ledger: the newest event seen for the key, as
/// (sequencer, ETag). The applied event's own when it is at least as new as the entry's;
/// the entry's when the event is older (a re-apply after a lost race) or carried no
/// sequencer (then only the version moves on: it still guards the race); for a first
/// event without one, a sequencer older than any S3 writes.
pub fn newest_applied(
    entry: Option<&LedgerEntry>,
    sequencer: Option<&str>,
    etag: &str,
) -> (String, String) {
    match (entry, sequencer) {
        (Some(e), Some(seq)) if e.sequencer.as_str() > seq => (e.sequencer.clone(), e.etag.clone()),
        (_, Some(seq)) => (seq.to_string(), etag.to_string()),
        (Some(e), None) => (e.sequencer.clone(), e.etag.clone()),
        (None, None) => ("0".repeat(SEQUENCER_WIDTH), etag.to_string()),
    }
}

/// How an event relates to what the ledger has applied for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Newer than anything applied: apply it.
    New,
    /// The very event already applied (same sequencer and ETag): skip.
    Duplicate,
    /// Older than what was applied: skip.
    Stale,
}

/// Compares an event (normalized sequencer, announced ETag) with the ledger entry.
/// The same sequencer with a different ETag is not taken as a duplicate: S3 never does
/// that, but some emulators send one constant sequencer, and replaying is safe.
pub fn freshness(entry: Option<&LedgerEntry>, sequencer: &str, etag: &str) -> Freshness {
    match entry {
        None => Freshness::New,
        Some(e) if sequencer > e.sequencer.as_str() => Freshness::New,
        Some(e) if sequencer == e.sequencer && etag == e.etag => Freshness::Duplicate,
        Some(e) if sequencer == e.sequencer => Freshness::New,
        Some(_) => Freshness::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: &str, etag: &str) -> LedgerEntry {
        LedgerEntry {
            sequencer: normalize_sequencer(seq).unwrap(),
            etag: etag.into(),
            version: 1,
        }
    }

    #[test]
    fn sequencers_of_different_length_compare_after_right_padding() {
        // From S3's docs: compare after right-padding the shorter one with zeros.
        let short = normalize_sequencer("0055AED6DCD9028").unwrap();
        let long = normalize_sequencer("0055AED6DCD90281E5").unwrap();
        assert!(long > short);
        assert_eq!(normalize_sequencer("0a"), normalize_sequencer("0A00"));
        assert!(normalize_sequencer("not-hex").is_none());
        assert!(normalize_sequencer("").is_none());
    }

    #[test]
    fn newest_event_wins() {
        let applied = entry("0055AED6DCD90281E5", "etag-b");
        let newer = normalize_sequencer("0055AED6DCD90281F0").unwrap();
        let older = normalize_sequencer("0055AED6DCD90281A0").unwrap();
        let same = normalize_sequencer("0055AED6DCD90281E5").unwrap();
        assert_eq!(freshness(None, &older, "x"), Freshness::New);
        assert_eq!(freshness(Some(&applied), &newer, "etag-c"), Freshness::New);
        assert_eq!(
            freshness(Some(&applied), &older, "etag-a"),
            Freshness::Stale
        );
        assert_eq!(
            freshness(Some(&applied), &same, "etag-b"),
            Freshness::Duplicate
        );
        assert_eq!(
            freshness(Some(&applied), &same, "etag-other"),
            Freshness::New
        );
    }
}
