//! Parallel discovery: the key space of a rule's prefixes is listed by many listers at
//! once, never by one LIST chain, and cut into segments while it is listed. The listing
//! planner (`Backfiller::plan`, `worker.rs`) runs it with `BackfillSettings::listers`
//! listers; each segment is recorded (`Backfiller::cut`) as soon as it is cut, and the
//! workers copy it while discovery goes on.
//!
//! A lister owns an open range `(after, upto]` and lists it page by page, counting, cutting
//! a segment every `segment_objects` keys (the range's `after` moves up to each cut).
//! Whenever a lister is busy and there is room for another (fewer than `listers` at work,
//! nothing queued), it splits its range:
//! - where the keys have structure, by common prefixes: a whole prefix is first listed
//!   with the delimiter `/`, and its sub-prefixes become ranges of their own (the keys
//!   between two sub-prefixes go with the range that ends at the next one);
//! - where they do not, by the keys themselves: the rest of the range is divided at the
//!   position where the page just listed began to vary (`split_points`), and the parts
//!   above the first split go to other listers (start-after at each split point).
//!
//! Every key is in exactly one range: a split only ever divides `(after, upto]` at a
//! string `m` into `(after, m]` and `(m, upto]`, above what its lister has listed. The
//! open ranges (the *frontier*: each with how far it was listed and what it counted since
//! its last cut) and the segments cut so far partition the key space at every moment, and
//! each cut hands the sink the frontier as it stands after the cut: stored with the cut
//! in one atomic write, it is where the next invocation resumes (nothing counted twice,
//! nothing missed; work listed after the last cut is listed again). A sink that refuses
//! a cut (another invocation recorded one first) stops the discovery.
//!
//! The segments are exact (their counts were listed), so the job's total is final once
//! the frontier is empty; until then the counts so far are a lower bound, and the status
//! says so (`total_final`).

use std::collections::{BTreeMap, VecDeque};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

use crate::error::Result;

/// S3's longest key, in bytes: a split string longer than this could not be sent as
/// `start-after`.
pub const MAX_KEY_BYTES: usize = 1024;

/// The delimiter that gives keys their structure.
pub const DELIMITER: &str = "/";

/// What the frontier may take in the job item (DynamoDB items are at most 400 KB; the
/// rest of the job item is small): splits that would make it larger are made coarser.
pub const MAX_FRONTIER_BYTES: usize = 200 * 1024;

/// Keys `k` under `prefix` with `after < k` (any, if `None`) and `k <= upto` (any, if
/// `None`), in S3's order (UTF-8 bytes, which is `String`'s order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub prefix: String,
    pub after: Option<String>,
    pub upto: Option<String>,
}

impl KeyRange {
    /// The whole of `prefix`.
    pub fn whole(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            after: None,
            upto: None,
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
            && self.after.as_deref().is_none_or(|a| key > a)
            && self.upto.as_deref().is_none_or(|u| key <= u)
    }
}

/// A range of the frontier: still to be listed beyond `listed`, and cut from `range.after`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenRange {
    /// What is left of the range: its `after` is its last cut (or its start).
    pub range: KeyRange,
    /// The last key counted (`None`: nothing counted beyond `range.after` yet); listing
    /// resumes after it.
    pub listed: Option<String>,
    /// Objects and bytes counted in `(range.after, listed]`, not in a segment yet.
    pub objects: u64,
    pub bytes: u64,
}

impl OpenRange {
    /// The whole of `prefix`, nothing listed.
    pub fn whole(prefix: &str) -> Self {
        Self {
            range: KeyRange::whole(prefix),
            ..Self::default()
        }
    }

    /// About what the range takes stored (its strings and some room for names and numbers).
    pub fn stored_bytes(&self) -> usize {
        let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.range.prefix.len()
            + len(&self.range.after)
            + len(&self.range.upto)
            + len(&self.listed)
            + 64
    }

    /// Where the next page starts (exclusive).
    fn position(&self) -> Option<&str> {
        self.listed.as_deref().or(self.range.after.as_deref())
    }

    /// A whole prefix, nothing listed: the one kind of range split by the delimiter.
    fn untouched_whole(&self) -> bool {
        self.range.after.is_none() && self.range.upto.is_none() && self.listed.is_none()
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Keys and their sizes, in order.
    pub keys: Vec<(String, u64)>,
    /// With a delimiter: the sub-prefixes (each ending with the delimiter), in order.
    pub common_prefixes: Vec<String>,
    /// Whether more keys follow.
    pub truncated: bool,
}

/// The listing discovery needs (ListObjectsV2).
#[async_trait]
pub trait KeyLister: Send + Sync {
    /// Up to `max_keys` keys under `prefix` after `start_after`, with `delimiter` if given.
    async fn page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: Option<&str>,
        max_keys: i32,
    ) -> Result<Page>;
}

/// A bucket, listed for discovery.
pub struct StoreLister<'a>(pub &'a dyn crate::object_store::ObjectStore);

#[async_trait]
impl KeyLister for StoreLister<'_> {
    async fn page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: Option<&str>,
        max_keys: i32,
    ) -> Result<Page> {
        let page = match delimiter {
            Some(d) => {
                self.0
                    .list_delimited(prefix, start_after, d, max_keys)
                    .await?
            }
            None => crate::object_store::DelimitedPage::from(
                self.0.list_page(prefix, start_after, max_keys).await?,
            ),
        };
        Ok(Page {
            keys: page.objects.into_iter().map(|o| (o.key, o.size)).collect(),
            common_prefixes: page.common_prefixes,
            truncated: page.truncated,
        })
    }
}

/// A range found, with what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub range: KeyRange,
    pub objects: u64,
    pub bytes: u64,
}

/// Where discovered segments go, as soon as they are cut.
#[async_trait]
pub trait SegmentSink: Send + Sync {
    /// Records `found` and the frontier as it stands after it (`frontier`: every range
    /// still open, in no particular order), together, atomically. `Ok(false)`: not
    /// recorded, because another discovery of the same key space recorded a cut first;
    /// this one stops.
    async fn segment(&self, found: Found, frontier: &[OpenRange]) -> Result<bool>;
}

/// How discovery runs.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// Listers at work at once.
    pub listers: usize,
    /// Keys per segment.
    pub segment_objects: u64,
    /// Keys per LIST page (S3's maximum is 1,000).
    pub page_size: i32,
    /// No page is started after it (the frontier then holds what is left).
    pub stop_at: Option<Instant>,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            listers: 16,
            segment_objects: 10_000,
            page_size: 1000,
            stop_at: None,
        }
    }
}

/// What discovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryReport {
    pub objects: u64,
    pub bytes: u64,
    pub segments: u64,
    /// LIST requests in all (the time discovery takes is fewer LIST latencies than this:
    /// `listers` of them run at once).
    pub lists: u64,
    /// Ranges handed to other listers.
    pub splits: u64,
    /// The ranges still open when it stopped (empty: the key space is all cut).
    pub frontier: Vec<OpenRange>,
    /// The sink refused a cut: another discovery is ahead, and this one stopped.
    pub overtaken: bool,
}

/// The discovery's state, under one lock: ranges change and cuts are recorded under it,
/// so each cut's frontier is a consistent picture.
struct State {
    /// Every open range, by id.
    open: BTreeMap<u64, OpenRange>,
    /// Open ranges no lister works on.
    queue: VecDeque<u64>,
    /// Listers at work.
    active: usize,
    next_id: u64,
    report: DiscoveryReport,
}

impl State {
    fn frontier(&self) -> Vec<OpenRange> {
        self.open.values().cloned().collect()
    }

    fn frontier_bytes(&self) -> usize {
        self.open.values().map(OpenRange::stored_bytes).sum()
    }

    /// Whether another lister would find work idle: fewer at work than allowed, none queued.
    fn room(&self, listers: usize) -> bool {
        self.queue.is_empty() && self.active < listers
    }

    fn push(&mut self, range: OpenRange) {
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(id, range);
        self.queue.push_back(id);
        self.report.splits += 1;
    }
}

struct Shared<'a> {
    /// Ranges, queue and report: changed under this lock, never held across an await (the
    /// listers are futures of one task, polled by `discover`, which takes it too).
    state: std::sync::Mutex<State>,
    /// Held while a cut is applied and recorded: cuts are recorded one at a time, each
    /// with the frontier as it is right after it.
    recording: Mutex<()>,
    /// Rings when ranges are queued, so idle slots get listers at once.
    queued: Notify,
    options: &'a DiscoveryOptions,
    lister: &'a dyn KeyLister,
    sink: &'a dyn SegmentSink,
}

impl Shared<'_> {
    fn out_of_time(&self) -> bool {
        self.options.stop_at.is_some_and(|at| Instant::now() >= at)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the state half-changed: each change is made whole
        // under the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The frontier of a discovery not started yet: the whole of each prefix.
pub fn start(prefixes: &[String]) -> Vec<OpenRange> {
    prefixes.iter().map(|p| OpenRange::whole(p)).collect()
}

/// Lists the open ranges of `frontier` (a fresh one from `start`, or one a stopped
/// discovery left) with up to `options.listers` listers at once, handing each segment to
/// `sink` as soon as it is cut, with the frontier after it. Stops when the frontier is
/// empty, at `options.stop_at`, or when the sink refuses a cut.
pub async fn discover(
    lister: &dyn KeyLister,
    sink: &dyn SegmentSink,
    frontier: Vec<OpenRange>,
    options: &DiscoveryOptions,
) -> Result<DiscoveryReport> {
    let count = frontier.len() as u64;
    let shared = Shared {
        state: std::sync::Mutex::new(State {
            open: (0..count).zip(frontier).collect(),
            queue: (0..count).collect(),
            active: 0,
            next_id: count,
            report: DiscoveryReport::default(),
        }),
        recording: Mutex::new(()),
        queued: Notify::new(),
        options,
        lister,
        sink,
    };
    let mut running = FuturesUnordered::new();
    loop {
        // Start a lister for every queued range there is room for.
        {
            let mut state = shared.state();
            while state.active < options.listers.max(1) && !state.report.overtaken {
                let Some(id) = state.queue.pop_front() else {
                    break;
                };
                state.active += 1;
                running.push(list_range(&shared, id));
            }
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            listed = running.next() => {
                if let Some(listed) = listed {
                    listed?;
                }
            }
            () = shared.queued.notified() => {}
        }
    }
    drop(running);
    let mut state = shared.state.into_inner().unwrap_or_else(|p| p.into_inner());
    state.report.frontier = state.open.into_values().collect();
    Ok(state.report)
}

/// One lister: lists the open range `id` page by page, cutting segments, splitting off
/// what another lister can take, until the range is all cut (or discovery stops).
async fn list_range(shared: &Shared<'_>, id: u64) -> Result<()> {
    let listed = list_range_pages(shared, id).await;
    shared.state().active -= 1;
    listed
}

async fn list_range_pages(shared: &Shared<'_>, id: u64) -> Result<()> {
    let opts = shared.options;
    // Only this lister changes its range (its own splits included): what it reads of it
    // stays true until it changes it.
    let Some(open) = shared.state().open.get(&id).cloned() else {
        return Ok(());
    };
    // A whole prefix is split by its structure first.
    if open.untouched_whole() && !shared.out_of_time() {
        let page = shared
            .lister
            .page(&open.range.prefix, None, Some(DELIMITER), opts.page_size)
            .await?;
        let mut state = shared.state();
        state.report.lists += 1;
        if page.common_prefixes.len() >= 2
            || (!page.common_prefixes.is_empty() && !page.keys.is_empty())
        {
            // Boundaries just below each sub-prefix: (.., b1], (b1, b2], ..., (bn, ..).
            let bounds: Vec<String> = page
                .common_prefixes
                .iter()
                .filter_map(|cp| predecessor(cp))
                .collect();
            let bounds = within_budget(bounds, &open.range.prefix, state.frontier_bytes());
            let mut after: Option<String> = None;
            for bound in bounds {
                state.push(OpenRange {
                    range: KeyRange {
                        prefix: open.range.prefix.clone(),
                        after: after.clone(),
                        upto: Some(bound.clone()),
                    },
                    ..OpenRange::default()
                });
                after = Some(bound);
            }
            // The rest (the last sub-prefix and what follows) stays with this lister.
            if let Some(mine) = state.open.get_mut(&id) {
                mine.range.after = after;
            }
            drop(state);
            shared.queued.notify_one();
        }
    }
    // Keys this lister counted in its range: a range is split only once it has shown
    // it holds more than a couple of pages (or a segment), so a small bucket is not cut
    // into many empty ranges, each a LIST and a segment.
    let mut counted_here = 0u64;
    let split_after = opts
        .segment_objects
        .min(2 * u64::try_from(opts.page_size.max(1)).unwrap_or(1000));
    loop {
        if shared.out_of_time() {
            return Ok(());
        }
        let open = {
            let state = shared.state();
            if state.report.overtaken {
                return Ok(());
            }
            match state.open.get(&id) {
                Some(open) => open.clone(),
                None => return Ok(()),
            }
        };
        let prefix = open.range.prefix.clone();
        let page = shared
            .lister
            .page(&prefix, open.position(), None, opts.page_size)
            .await?;
        shared.state().report.lists += 1;
        let upto = open.range.upto.clone();
        // The page's keys within the range; the range ends with this page if a key lies
        // beyond it, or one is its very end, or the listing has no more.
        let mut keys: Vec<&(String, u64)> = Vec::with_capacity(page.keys.len());
        let mut ended = !page.truncated || page.keys.is_empty();
        for entry in &page.keys {
            match upto.as_deref() {
                Some(u) if entry.0.as_str() > u => {
                    ended = true;
                    break;
                }
                Some(u) if entry.0.as_str() == u => {
                    keys.push(entry);
                    ended = true;
                    break;
                }
                _ => keys.push(entry),
            }
        }
        // Cuts every `segment_objects` keys counted (from what the range had counted).
        let mut cuts: Vec<Found> = Vec::new();
        let (mut objects, mut bytes) = (open.objects, open.bytes);
        let mut after = open.range.after.clone();
        for (key, size) in keys.iter().map(|e| (&e.0, e.1)) {
            objects += 1;
            bytes += size;
            if objects >= opts.segment_objects.max(1) {
                cuts.push(Found {
                    range: KeyRange {
                        prefix: prefix.clone(),
                        after: after.clone(),
                        upto: Some(key.clone()),
                    },
                    objects,
                    bytes,
                });
                after = Some(key.clone());
                (objects, bytes) = (0, 0);
            }
        }
        let listed = keys.last().map(|e| e.0.clone()).or(open.listed.clone());
        counted_here += keys.len() as u64;
        if ended {
            // The rest of the range is the last segment: the last cut reaches to the
            // range's end when nothing was counted after it (no empty segment after a cut
            // on the range's last key), else the rest is one more segment (an empty one for
            // an empty range, so the key space stays covered should keys appear there
            // before the copy).
            match cuts.last_mut() {
                Some(last) if objects == 0 => last.range.upto = upto.clone(),
                _ => cuts.push(Found {
                    range: KeyRange {
                        prefix: prefix.clone(),
                        after: after.clone(),
                        upto: upto.clone(),
                    },
                    objects,
                    bytes,
                }),
            }
        }
        if !record_cuts(shared, id, cuts, ended, &listed, (objects, bytes)).await? || ended {
            return Ok(());
        }
        let mut state = shared.state();
        let Some(mine) = state.open.get_mut(&id) else {
            return Ok(());
        };
        mine.listed = listed.clone();
        (mine.objects, mine.bytes) = (objects, bytes);
        // More to list: hand what lies above to other listers if they would be idle.
        if state.room(opts.listers)
            && counted_here >= split_after
            && let Some(from) = listed
        {
            let points = split_points(&page.keys, &from, upto.as_deref(), &prefix);
            let points = within_budget(points, &prefix, state.frontier_bytes());
            // About as many parts as there are idle listers (at least a few, as the parts
            // are guessed from one page and rarely even): more would wait in the queue, and
            // the empty ones cost a LIST and an (empty) segment each.
            let idle = opts.listers.saturating_sub(state.active);
            let points = spread(points, idle.max(MIN_SPLIT_PARTS));
            if let Some(first) = points.first().cloned() {
                let mut bounds = points.clone();
                bounds.push(String::new());
                for pair in bounds.windows(2) {
                    let part_upto = if pair[1].is_empty() {
                        upto.clone()
                    } else {
                        Some(pair[1].clone())
                    };
                    state.push(OpenRange {
                        range: KeyRange {
                            prefix: prefix.clone(),
                            after: Some(pair[0].clone()),
                            upto: part_upto,
                        },
                        ..OpenRange::default()
                    });
                }
                if let Some(mine) = state.open.get_mut(&id) {
                    mine.range.upto = Some(first);
                }
                drop(state);
                shared.queued.notify_one();
            }
        }
    }
}

/// Records the cuts of one page of range `id`, in order, each with the frontier right
/// after it: the range then starts at the cut, listed up to `listed` (the page's last key
/// in range), with what the page counted beyond the cut (`rest`: beyond the last cut); the
/// last cut of a page that `ended` the range removes it. `Ok(false)` if the sink refused.
async fn record_cuts(
    shared: &Shared<'_>,
    id: u64,
    cuts: Vec<Found>,
    ended: bool,
    listed: &Option<String>,
    rest: (u64, u64),
) -> Result<bool> {
    if cuts.is_empty() {
        return Ok(true);
    }
    // What was counted beyond each cut: the rest, plus the cuts after it.
    let mut beyond = Vec::with_capacity(cuts.len());
    let (mut o, mut b) = rest;
    for cut in cuts.iter().rev() {
        beyond.push((o, b));
        (o, b) = (o + cut.objects, b + cut.bytes);
    }
    beyond.reverse();
    let last = cuts.len();
    let _recording = shared.recording.lock().await;
    for (n, (cut, (objects, bytes))) in cuts.into_iter().zip(beyond).enumerate() {
        let frontier = {
            let mut state = shared.state();
            if state.report.overtaken {
                return Ok(false);
            }
            if ended && n + 1 == last {
                state.open.remove(&id);
            } else if let Some(mine) = state.open.get_mut(&id) {
                mine.range.after = cut.range.upto.clone();
                mine.listed = listed.clone();
                (mine.objects, mine.bytes) = (objects, bytes);
            }
            state.frontier()
        };
        let (objects, bytes) = (cut.objects, cut.bytes);
        let recorded = shared.sink.segment(cut, &frontier).await?;
        let mut state = shared.state();
        if !recorded {
            state.report.overtaken = true;
            return Ok(false);
        }
        state.report.segments += 1;
        state.report.objects += objects;
        state.report.bytes += bytes;
    }
    Ok(true)
}

/// At most `n` of `points`, spread over the whole list (kept in order).
fn spread(points: Vec<String>, n: usize) -> Vec<String> {
    let len = points.len();
    if len <= n {
        return points;
    }
    (0..n).map(|i| points[i * len / n].clone()).collect()
}

/// Of the split strings `points` (sorted), as many as the frontier has room for (each
/// makes one more open range), spread over the whole list.
fn within_budget(points: Vec<String>, prefix: &str, frontier_bytes: usize) -> Vec<String> {
    let room = MAX_FRONTIER_BYTES.saturating_sub(frontier_bytes);
    // A new range holds its prefix and two bounds (about the longest a point here is).
    let longest = points.iter().map(String::len).max().unwrap_or(0);
    let each = prefix.len() + 2 * longest + 64;
    spread(points, room / each.max(1))
}

/// Parts a split makes at least, when there are that many split points.
const MIN_SPLIT_PARTS: usize = 4;

/// Split points offered at most in one split (empty ranges cost one LIST each).
const MAX_SPLIT_POINTS: usize = 128;

/// Where to divide the rest of a range, from the page just listed: the keys ahead are
/// guessed to vary where the page's keys began to vary, and above. With `j` the first
/// position where the page's first and last keys differ, each position `q` from `j - 1`
/// back to the prefix gives the points "the last key's first `q` characters, then a
/// character seen in the page greater than the last key's own at `q`": a ladder, fine
/// near the last key and coarse far from it (`seq/00000999` splits at `seq/00001`..
/// `seq/00009`, `seq/0001`..`seq/0009`, `seq/001`.. and so on; random hex `00..`-`01..` at
/// `1`, `2`.. `f`). Points are above `from`, below `upto`, sorted, at most
/// [`MAX_SPLIT_POINTS`] (the coarse ones kept first).
fn split_points(
    page: &[(String, u64)],
    from: &str,
    upto: Option<&str>,
    prefix: &str,
) -> Vec<String> {
    let Some((first, _)) = page.first() else {
        return vec![];
    };
    let first: Vec<char> = first.chars().collect();
    let last: Vec<char> = from.chars().collect();
    let skip = prefix.chars().count();
    let j = first.iter().zip(&last).take_while(|(a, b)| a == b).count();
    let alphabet: std::collections::BTreeSet<char> = page
        .iter()
        .flat_map(|(k, _)| k.chars().skip(skip))
        .collect();
    let deepest = j
        .saturating_sub(1)
        .max(skip)
        .min(last.len().saturating_sub(1));
    let mut points: Vec<String> = vec![];
    for q in skip..=deepest {
        let Some(&own) = last.get(q) else { break };
        let stem: String = last[..q].iter().collect();
        let level: Vec<String> = alphabet
            .range((std::ops::Bound::Excluded(own), std::ops::Bound::Unbounded))
            .map(|c| format!("{stem}{c}"))
            .filter(|m| m.as_str() > from && upto.is_none_or(|u| m.as_str() < u))
            .filter(|m| m.len() <= MAX_KEY_BYTES)
            .collect();
        if points.len() + level.len() > MAX_SPLIT_POINTS {
            break;
        }
        points.extend(level);
    }
    points.sort();
    points.dedup();
    points
}

/// The greatest key below `s` (keys are at most [`MAX_KEY_BYTES`] long): `s` with its
/// last character lowered by one and the rest filled as high as a key can go (see
/// [`greatest_under`]). `None` for the empty string or one whose last character is U+0000.
pub fn predecessor(s: &str) -> Option<String> {
    let mut chars: Vec<char> = s.chars().collect();
    let last = chars.pop()? as u32;
    if last == 0 {
        return None;
    }
    // Below U+E000 lies the surrogate gap: the next lower character is U+D7FF.
    let lowered = char::from_u32(last - 1).or((last == 0xE000).then_some('\u{D7FF}'))?;
    let lowered = xml_char_at_most(lowered)?;
    let mut out: String = chars.into_iter().collect();
    out.push(lowered);
    Some(greatest_under(out))
}

/// The greatest character at most `c` that XML 1.0 allows (a split bound is sent as
/// StartAfter and echoed in the XML answer): `None` below U+0009.
fn xml_char_at_most(c: char) -> Option<char> {
    match c {
        '\u{FFFE}' | '\u{FFFF}' => Some('\u{FFFD}'),
        '\u{0E}'..='\u{1F}' => Some('\r'),
        '\u{0B}' | '\u{0C}' => Some('\n'),
        '\u{0}'..='\u{8}' => None,
        c => Some(c),
    }
}

/// The greatest string of at most [`MAX_KEY_BYTES`] bytes that starts with `stem`: `stem`
/// filled with the highest character (4 bytes in UTF-8), then with the highest XML
/// character that fits in the 1 to 3 bytes left.
pub fn greatest_under(mut stem: String) -> String {
    while stem.len() + 4 <= MAX_KEY_BYTES {
        stem.push(char::MAX);
    }
    match MAX_KEY_BYTES.saturating_sub(stem.len()) {
        // U+FFFE and U+FFFF are not XML characters: a ListObjectsV2 answer echoing the
        // bound as StartAfter without encoding it (moto's) could not be read.
        3 => stem.push('\u{FFFD}'),
        2 => stem.push('\u{7FF}'),
        1 => stem.push('\u{7F}'),
        _ => {}
    }
    stem
}

/// The stem `greatest_under` filled to make `s`, if it is such a string (a compact form
/// to store it in); `greatest_under(stem) == s`.
pub fn stem_of_greatest(s: &str) -> Option<&str> {
    if s.len() + 4 <= MAX_KEY_BYTES {
        return None;
    }
    let mut stem = s;
    if let Some(last) = stem.chars().last()
        && matches!(last, '\u{FFFD}' | '\u{7FF}' | '\u{7F}')
    {
        stem = &stem[..stem.len() - last.len_utf8()];
    }
    let stem = stem.trim_end_matches(char::MAX);
    (greatest_under(stem.to_string()) == s).then_some(stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex as StdMutex};

    /// A bucket in memory. Each LIST takes 100 ms of the test's paused clock, so listers
    /// interleave as they would against S3, and the time discovery takes is measured.
    struct Keys(BTreeMap<String, u64>);

    const LIST: std::time::Duration = std::time::Duration::from_millis(100);

    #[async_trait]
    impl KeyLister for Keys {
        async fn page(
            &self,
            prefix: &str,
            start_after: Option<&str>,
            delimiter: Option<&str>,
            max_keys: i32,
        ) -> Result<Page> {
            tokio::time::sleep(LIST).await;
            let mut page = Page::default();
            let mut taken = 0;
            let mut iter = self
                .0
                .range::<str, _>((
                    start_after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                    std::ops::Bound::Unbounded,
                ))
                .filter(|(k, _)| k.starts_with(prefix))
                .peekable();
            while let Some((k, size)) = iter.next() {
                if taken == max_keys {
                    page.truncated = true;
                    break;
                }
                if let Some(d) = delimiter
                    && let Some(pos) = k[prefix.len()..].find(d)
                {
                    let cp = k[..prefix.len() + pos + d.len()].to_string();
                    if page.common_prefixes.last() != Some(&cp) {
                        page.common_prefixes.push(cp.clone());
                        taken += 1;
                    }
                    // Skip the rest of this sub-prefix.
                    while iter.peek().is_some_and(|(n, _)| n.starts_with(&cp)) {
                        iter.next();
                    }
                    continue;
                }
                page.keys.push((k.clone(), *size));
                taken += 1;
            }
            Ok(page)
        }
    }

    /// Collects the segments, keeps the last frontier, and refuses cuts once `refuse_after`
    /// were taken (another discovery ahead).
    #[derive(Default)]
    struct Collect {
        found: StdMutex<Vec<Found>>,
        frontier: StdMutex<Vec<OpenRange>>,
        refuse_after: Option<usize>,
    }

    #[async_trait]
    impl SegmentSink for Collect {
        async fn segment(&self, found: Found, frontier: &[OpenRange]) -> Result<bool> {
            // A store's write takes time: other listers go on meanwhile.
            tokio::time::sleep(LIST / 4).await;
            let mut all = self.found.lock().unwrap();
            if self.refuse_after.is_some_and(|n| all.len() >= n) {
                return Ok(false);
            }
            all.push(found);
            *self.frontier.lock().unwrap() = frontier.to_vec();
            Ok(true)
        }
    }

    /// Runs discovery; returns its report, the segments, and how many LIST latencies it
    /// took (by the paused clock).
    async fn run(
        keys: &BTreeMap<String, u64>,
        prefix: &str,
        options: DiscoveryOptions,
    ) -> (DiscoveryReport, Vec<Found>, u64) {
        let sink = Collect::default();
        let started = tokio::time::Instant::now();
        let report = discover(
            &Keys(keys.clone()),
            &sink,
            start(&[prefix.to_string()]),
            &options,
        )
        .await
        .unwrap();
        assert!(report.frontier.is_empty() && !report.overtaken);
        let found = sink.found.lock().unwrap().clone();
        let took = (started.elapsed().as_millis() / LIST.as_millis()) as u64;
        println!("{prefix}: {report:?}, took {took} LIST latencies");
        (report, found, took)
    }

    /// Every key under `prefix` is in exactly one segment, and each segment's count is
    /// the keys it holds.
    fn assert_partition(keys: &BTreeMap<String, u64>, prefix: &str, found: &[Found]) {
        for (key, _) in keys.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let holders = found.iter().filter(|f| f.range.contains(key)).count();
            assert_eq!(holders, 1, "{key:?} is in {holders} segments");
        }
        for f in found {
            let held: Vec<_> = keys.iter().filter(|(k, _)| f.range.contains(k)).collect();
            assert_eq!(held.len() as u64, f.objects, "{:?}", f.range);
            assert_eq!(held.iter().map(|(_, s)| **s).sum::<u64>(), f.bytes);
        }
    }

    fn options(listers: usize, segment: u64) -> DiscoveryOptions {
        DiscoveryOptions {
            listers,
            segment_objects: segment,
            page_size: 100,
            stop_at: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn structured_keys_are_split_by_their_sub_prefixes_and_listed_in_parallel() {
        let mut keys = BTreeMap::new();
        for d in 0..20 {
            for i in 0..500 {
                keys.insert(format!("logs/2026-{d:02}/part-{i:05}.gz"), (i % 7) as u64);
            }
        }
        keys.insert("logs/README".into(), 3);
        keys.insert("logs/2026-05".into(), 1); // a key equal to a sub-prefix without its '/'
        keys.insert("logs/2026-05/".into(), 2); // a "folder" object
        keys.insert("other/x".into(), 5);
        let (report, found, took) = run(&keys, "logs/", options(8, 300)).await;
        assert_partition(&keys, "logs/", &found);
        assert_eq!(report.objects, 10_003);
        // One chain would be 101 pages in a row; eight listers over 20 sub-prefixes take
        // about an eighth of that, at about one LIST per page in all.
        assert!(took <= 101 / 2, "took {took}");
        assert!(report.splits >= 19, "{report:?}");
        assert!(report.lists <= 101 + report.splits + 10, "{report:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_without_structure_are_bisected() {
        let mut keys = BTreeMap::new();
        let mut rng = 7u64;
        for _ in 0..20_000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k: String = format!("{:016x}", rng).chars().collect();
            keys.insert(format!("blobs/{k}"), 1);
        }
        let (report, found, took) = run(&keys, "blobs/", options(8, 1000)).await;
        assert_partition(&keys, "blobs/", &found);
        assert_eq!(report.objects, 20_000);
        // One chain: 200 pages in a row. Splitting where the keys vary spreads them.
        assert!(took <= 200 / 3, "took {took}");
        assert!(report.splits >= 7, "{report:?}");
        assert!(report.lists <= 200 + report.splits + 10, "{report:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_time_shrinks_with_the_listers() {
        // 200,000 sequential keys (no structure below the prefix), pages of 1,000.
        let keys: BTreeMap<String, u64> =
            (0..200_000).map(|i| (format!("seq/{i:08}"), 1)).collect();
        let mut took_with = vec![];
        for listers in [1, 4, 16] {
            let options = DiscoveryOptions {
                listers,
                segment_objects: 10_000,
                page_size: 1000,
                stop_at: None,
            };
            let (report, found, took) = run(&keys, "seq/", options).await;
            assert_eq!(report.objects, 200_000);
            assert_eq!(found.iter().map(|f| f.objects).sum::<u64>(), 200_000);
            took_with.push(took);
        }
        // One lister: the 200 pages in a row (and the delimiter listing); 4 and 16 listers
        // take 65 and 29 LIST latencies here (3.2x and 7.1x faster).
        assert!(took_with[0] >= 200, "{took_with:?}");
        assert!(took_with[1] * 5 <= took_with[0] * 2, "{took_with:?}");
        assert!(took_with[2] * 6 <= took_with[0], "{took_with:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn odd_keys_are_covered_with_one_lister_or_many() {
        let mut keys = BTreeMap::new();
        for (i, k) in [
            "a",
            "a b",
            "a+b",
            "a%20",
            "é",
            "日本/語",
            "\u{10FFFF}x",
            "z//y",
            "z/./y",
        ]
        .iter()
        .enumerate()
        {
            keys.insert(format!("p/{k}"), i as u64);
        }
        let (report, found, _) = run(&keys, "p/", options(1, 2)).await;
        assert_partition(&keys, "p/", &found);
        assert_eq!(report.objects, 9);
        let (_, found, _) = run(&keys, "p/", options(4, 2)).await;
        assert_partition(&keys, "p/", &found);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_bucket_is_one_segment_whatever_the_listers() {
        let keys: BTreeMap<String, u64> = (0..20).map(|i| (format!("k/{i:02}"), 1)).collect();
        let options = DiscoveryOptions {
            page_size: 10,
            ..options(16, 100)
        };
        let (report, found, _) = run(&keys, "k/", options).await;
        assert_eq!((report.segments, report.lists, report.splits), (1, 3, 0));
        assert_eq!(found[0].range, KeyRange::whole("k/"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_prefix_is_one_empty_segment() {
        let keys = BTreeMap::from([("q/x".to_string(), 1u64)]);
        let (report, found, _) = run(&keys, "p/", options(4, 10)).await;
        assert_eq!(report.objects, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].range, KeyRange::whole("p/"));
    }

    /// The job item as the store keeps it: the segments cut, and the frontier written
    /// with the last of them; a cut is taken only by the discovery that read the item at
    /// the segment count it has now (the store's condition on `segment_count`).
    #[derive(Default)]
    struct JobItem {
        found: Vec<Found>,
        frontier: Vec<OpenRange>,
    }

    struct Cutter {
        item: Arc<StdMutex<JobItem>>,
        expected: StdMutex<usize>,
    }

    #[async_trait]
    impl SegmentSink for Cutter {
        async fn segment(&self, found: Found, frontier: &[OpenRange]) -> Result<bool> {
            tokio::time::sleep(LIST / 4).await;
            let mut item = self.item.lock().unwrap();
            let mut expected = self.expected.lock().unwrap();
            if item.found.len() != *expected {
                return Ok(false);
            }
            item.found.push(found);
            item.frontier = frontier.to_vec();
            *expected += 1;
            Ok(true)
        }
    }

    /// One invocation: reads the item, resumes from its frontier, stops after `lists`
    /// LIST latencies. `true` once the key space is all cut.
    async fn invocation(
        keys: &BTreeMap<String, u64>,
        item: &Arc<StdMutex<JobItem>>,
        lists: u32,
    ) -> bool {
        let (frontier, expected) = {
            let item = item.lock().unwrap();
            if item.found.is_empty() {
                (start(&["".to_string()]), 0)
            } else if item.frontier.is_empty() {
                return true;
            } else {
                (item.frontier.clone(), item.found.len())
            }
        };
        let sink = Cutter {
            item: item.clone(),
            expected: StdMutex::new(expected),
        };
        let options = DiscoveryOptions {
            listers: 8,
            segment_objects: 700,
            page_size: 100,
            stop_at: Some(Instant::now() + LIST * lists),
        };
        discover(&Keys(keys.clone()), &sink, frontier, &options)
            .await
            .unwrap();
        false
    }

    #[tokio::test(start_paused = true)]
    async fn stopped_and_racing_discoveries_resume_from_the_stored_frontier_exactly() {
        let mut keys = BTreeMap::new();
        let mut rng = 11u64;
        for i in 0..6_000u64 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            keys.insert(format!("blobs/{:012x}", rng >> 16), i % 13);
            keys.insert(format!("logs/{:02}/{:05}", i % 17, i), 1);
            if i % 3 == 0 {
                keys.insert(format!("seq{i:06}"), 2);
            }
        }
        let item = Arc::new(StdMutex::new(JobItem::default()));
        let mut invocations = 0;
        // Stopped every few LIST latencies, and two at once every other round: each stop
        // loses what was listed after its last cut, each race one side's cuts.
        loop {
            invocations += 1;
            assert!(invocations < 500, "no progress");
            let lists = 2 + invocations % 5;
            let done = if invocations % 2 == 0 {
                let (a, b) = tokio::join!(
                    invocation(&keys, &item, lists),
                    invocation(&keys, &item, lists + 2)
                );
                a || b
            } else {
                invocation(&keys, &item, lists).await
            };
            if done {
                break;
            }
        }
        let found = item.lock().unwrap().found.clone();
        println!("{} segments in {invocations} invocations", found.len());
        assert!(invocations > 5, "{invocations}");
        assert_partition(&keys, "", &found);
        assert_eq!(
            found.iter().map(|f| f.objects).sum::<u64>(),
            keys.len() as u64
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_discovery_overtaken_stops_at_its_refused_cut() {
        let keys: BTreeMap<String, u64> = (0..5_000).map(|i| (format!("k{i:05}"), 1)).collect();
        let sink = Collect {
            refuse_after: Some(3),
            ..Collect::default()
        };
        let report = discover(&Keys(keys), &sink, start(&["".into()]), &options(4, 200))
            .await
            .unwrap();
        assert!(report.overtaken);
        assert_eq!(report.segments, 3);
        assert_eq!(sink.found.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_split_string_is_stored_by_its_stem() {
        for s in ["logs/2026-05/", "a", "日本/", "x\u{10FFFF}/"] {
            let p = predecessor(s).unwrap();
            assert!(
                p.len() <= MAX_KEY_BYTES && p.len() > MAX_KEY_BYTES - 4,
                "{s:?}"
            );
            let stem = stem_of_greatest(&p).unwrap();
            assert_eq!(greatest_under(stem.to_string()), p);
            assert!(stem.len() <= s.len());
        }
        assert_eq!(stem_of_greatest("logs/2026"), None);
    }

    #[test]
    fn a_frontier_too_large_is_split_more_coarsely() {
        let points: Vec<String> = (0..1000)
            .map(|i| format!("{i:04}{}", "x".repeat(900)))
            .collect();
        let kept = within_budget(points.clone(), "p/", 0);
        assert!(kept.len() < 1000 && !kept.is_empty());
        assert!(kept.len() * (2 * 904 + 66) <= MAX_FRONTIER_BYTES);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert!(within_budget(points, "p/", MAX_FRONTIER_BYTES).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn mixed_keys_take_a_fraction_of_the_time_for_about_as_many_lists() {
        // A third hashes, two thirds sequence numbers, under two top-level "folders".
        let mut keys = BTreeMap::new();
        for i in 0..6000u64 {
            let x = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = match i % 3 {
                0 => format!("h/{:012x}", x >> 16),
                _ => format!("s/{i:08}"),
            };
            keys.insert(key, 1);
        }
        let mut measured = vec![];
        for listers in [1, 16] {
            let (report, found, took) = run(&keys, "", options(listers, 500)).await;
            assert_partition(&keys, "", &found);
            measured.push((report.lists, report.segments, took));
        }
        let [(lists1, _, took1), (lists16, segments16, took16)] = measured[..] else {
            unreachable!()
        };
        // One chain: 60 pages in a row (87 LISTs and 13 LIST latencies with 16 listers
        // here, in 40 segments where one chain cuts 14).
        assert!(took1 >= 60, "{measured:?}");
        assert!(took16 * 4 <= took1, "{measured:?}");
        assert!(lists16 * 2 <= lists1 * 3, "{measured:?}");
        assert!(segments16 <= 60, "{measured:?}");
    }

    #[test]
    fn split_bounds_hold_only_characters_xml_allows() {
        // Sent as StartAfter, a bound comes back in the XML answer: U+FFFF or a control
        // character there made moto's answer unreadable.
        let xml_ok = |c: char| {
            matches!(c, '\t' | '\n' | '\r')
                || ('\u{20}'..='\u{D7FF}').contains(&c)
                || ('\u{E000}'..='\u{FFFD}').contains(&c)
                || c >= '\u{10000}'
        };
        // (A key's own characters stay as they are: only those made here are checked.)
        for s in ["long.\u{10000}", "a\u{20}", "b\u{0C}", "x/", "\u{E000}"] {
            if let Some(p) = predecessor(s) {
                assert!(p.as_str() < s, "{s:?}");
                assert!(p.chars().all(xml_ok), "{s:?} -> {p:?}");
            }
        }
        let filled = greatest_under("k".repeat(MAX_KEY_BYTES - 3 - 4 * 10));
        assert!(filled.chars().all(xml_ok));
        assert_eq!(
            stem_of_greatest(&filled).map(str::len),
            Some(MAX_KEY_BYTES - 43)
        );
    }

    #[test]
    fn a_predecessor_is_below_its_string_and_above_every_key_before_it() {
        let p = predecessor("logs/2026-05/").unwrap();
        assert!(p.as_str() < "logs/2026-05/");
        assert!(p.as_str() > "logs/2026-05");
        assert!(p.as_str() > "logs/2026-05.\u{10FFFF}zzz");
        assert!(p.len() <= MAX_KEY_BYTES);
        assert!(predecessor("").is_none());
    }
}
