//! `crr status [RULE] [--watch] [--json [--series 24h]]`: the numbers come from `crr_shared::status`,
//! the code the status function runs; this file only draws them.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use crr_shared::series::Window;
use crr_shared::status::{
    EventQueue, HistoricalStatus, RuleStatus, SqsEventQueue, StatusReport, StatusService,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{AwsArgs, QueueArgs};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Only this rule.
    rule: Option<String>,
    /// Redraw every --interval seconds until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    /// Print the status function's JSON (one document per refresh with --watch).
    #[arg(long)]
    json: bool,
    /// Add the rule's minute-by-minute activity over this window (1h, 6h or 24h) to its
    /// JSON, as the status function's `?rule=ID&series=24h` does.
    #[arg(long, value_name = "WINDOW", requires_all = ["rule", "json"], value_parser = parse_window)]
    series: Option<Window>,
    /// Seconds S3 may take to deliver an event to the queue (see `synced_up_to` in the README).
    #[arg(long, env = "CRR_STATUS_SETTLE_SECS", default_value_t = 60)]
    settle_secs: u64,
    #[command(flatten)]
    queue: QueueArgs,
}

fn parse_window(text: &str) -> std::result::Result<Window, String> {
    Window::parse(text).map_err(|e| e.to_string())
}

pub async fn run(aws: &AwsArgs, args: StatusArgs) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = Arc::new(aws.state(&sdk).await);
    let service = service(
        &sdk,
        state,
        &args.queue,
        Duration::from_secs(args.settle_secs),
    );
    let rule = args.rule.as_deref();
    if !args.watch {
        let report = service.report_with(rule, args.series).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            Screen::new(std::io::stdout().is_terminal()).print(&frame(&report));
        }
        return Ok(());
    }
    let interval = Duration::from_secs_f64(args.interval.max(0.2));
    let mut screen = Screen::new(std::io::stdout().is_terminal());
    loop {
        // A refresh that fails is shown and retried; a missing rule ends the watch.
        let shown = match service.report_with(rule, args.series).await {
            Ok(report) if args.json => {
                println!("{}", serde_json::to_string(&report)?);
                None
            }
            Ok(report) => Some(frame(&report)),
            Err(e @ crr_shared::Error::RuleNotFound(_)) => return Err(e.into()),
            Err(e) if args.json => return Err(e.into()),
            Err(e) => Some(vec![Line::Alert(format!("refresh failed: {e}"))]),
        };
        if let Some(lines) = shown {
            screen.show(&lines);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    screen.leave();
    Ok(())
}

/// The status service over the table and, when given, the event queue: the code the
/// status function runs.
pub fn service(
    sdk: &aws_config::SdkConfig,
    state: Arc<crr_shared::dynamo::DynamoStore>,
    queue_args: &QueueArgs,
    settle: Duration,
) -> StatusService {
    let queue = queue_args.queue_url.as_ref().map(|url| {
        Arc::new(SqsEventQueue::new(
            queue_args.sqs_client(sdk, url),
            url,
            queue_args.dlq_url.clone(),
            // Only AWS publishes SQS metrics; a local stack has none to ask.
            queue_args
                .sqs_endpoint(url)
                .is_none()
                .then(|| crr_shared::adapters::aws_clients::cloudwatch(sdk)),
        )) as Arc<dyn EventQueue>
    });
    StatusService::new(state.clone(), state.clone(), state, queue, settle)
}

/// One line of the human view.
#[derive(Debug, Clone, PartialEq)]
enum Line {
    Text(String),
    /// A failure or anything that needs a look: drawn in red on terminals, marked `!` else.
    Alert(String),
    /// A progress bar: `percent` of the job (`None` while the total is being counted).
    Bar {
        label: String,
        percent: Option<f64>,
        message: String,
    },
}

fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

fn duration(secs: u64) -> String {
    indicatif::HumanDuration(Duration::from_secs(secs)).to_string()
}

/// The lines of the human view of a report.
fn frame(report: &StatusReport) -> Vec<Line> {
    let mut lines = vec![];
    let queue = match &report.queue {
        Some(q) => format!(
            "queue: {} waiting, {} in flight, {} delayed{}",
            q.waiting,
            q.in_flight,
            q.delayed,
            q.dead_letters
                .map(|n| format!(", {n} in the DLQ"))
                .unwrap_or_default()
        ),
        None => "queue: not watched (give --queue-url)".to_string(),
    };
    lines.push(Line::Text(format!(
        "crr status at {}  {queue}",
        report.generated_at.format("%Y-%m-%d %H:%M:%S UTC")
    )));
    if let Some(dead) = report.queue.as_ref().and_then(|q| q.dead_letters)
        && dead > 0
    {
        lines.push(Line::Alert(format!(
            "{dead} failed event(s) in the dead-letter queue: see why with the DLQ, replay with `crr redrive`"
        )));
    }
    if report.unattributed_failed > 0 {
        lines.push(Line::Alert(format!(
            "{} dead-lettered event(s) named no rule (malformed, or for a bucket no rule replicates)",
            report.unattributed_failed
        )));
    }
    if report.rules.is_empty() {
        lines.push(Line::Text(
            "no rules (create one with `crr rule create`)".into(),
        ));
    }
    for rule in &report.rules {
        lines.push(Line::Text(String::new()));
        lines.extend(rule_lines(rule));
    }
    lines
}

fn rule_lines(rule: &RuleStatus) -> Vec<Line> {
    let mut lines = vec![];
    let prefixes = if rule.prefixes.is_empty() {
        "all objects".to_string()
    } else {
        format!("prefixes {}", rule.prefixes.join(", "))
    };
    lines.push(Line::Text(format!(
        "rule {}: s3://{} ({}) -> s3://{} ({}), {prefixes}, policy {}{}",
        rule.rule_id,
        rule.source.bucket,
        rule.source.region,
        rule.target.bucket,
        rule.target.region,
        serde_json::to_value(rule.policy)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        if rule.paused { " [PAUSED]" } else { "" }
    )));
    let rt = &rule.realtime;
    let synced = match (rt.synced_up_to, rt.lag_seconds) {
        _ if rt.reason.is_some() => "nothing of it is replicated".to_string(),
        (Some(t), Some(lag)) => format!(
            "synced up to {} (lag {})",
            t.format("%Y-%m-%d %H:%M:%S UTC"),
            duration(lag)
        ),
        _ => "synced up to: unknown while events are pending".to_string(),
    };
    lines.push(Line::Text(format!(
        "  real-time   {:<12}{synced}; {} pending, {} in flight",
        rt.state.replace('_', " "),
        rt.pending,
        rt.in_flight
    )));
    if let Some(reason) = &rt.reason {
        lines.push(Line::Alert(format!("              {reason}")));
    }
    let counts = format!(
        "              replicated {} ({}), deletes {}, suppressed deletes {}, stale skipped {}, other skipped {}, failed {}",
        rt.replicated_objects,
        bytes(rt.replicated_bytes),
        rt.deletes,
        rt.suppressed_deletes,
        rt.skipped_stale,
        rt.skipped_other,
        rt.failed
    );
    lines.push(if rt.failed > 0 {
        Line::Alert(counts)
    } else {
        Line::Text(counts)
    });
    lines.push(historical_line(&rule.historical));
    if rule.historical.failed_objects > 0 {
        lines.push(Line::Alert(format!(
            "              backfill: {} failed object(s), skipped: `crr backfill failures {}`",
            rule.historical.failed_objects, rule.rule_id
        )));
    }
    if let Some(error) = &rule.historical.error {
        lines.push(Line::Alert(format!(
            "              backfill failed: {error}"
        )));
    }
    lines
}

fn historical_line(h: &HistoricalStatus) -> Line {
    let label = "  historical ".to_string();
    match h.phase.as_deref() {
        None => Line::Text(format!("{label} not requested")),
        // The totals are lower bounds while counting, so the percent is at most this.
        Some("counting") => Line::Bar {
            label,
            percent: h.percent_objects,
            message: format!(
                "{}: counting{}, {} objects ({}) so far; {} done (at most {:.1}%)",
                h.state,
                match h.total_source {
                    Some(crr_shared::status::TotalSource::Inventory) => " the inventory's rows",
                    _ => "",
                },
                h.objects_total,
                bytes(h.bytes_total),
                h.objects_done,
                h.percent_objects.unwrap_or(0.0),
            ),
        },
        Some(_) => {
            // Failed when examined; of those, still in the list now (retries take them off).
            let failed = match (h.failed, h.failed_objects) {
                (0, 0) => String::new(),
                (f, listed) if f == listed => format!(", {f} failed"),
                (f, listed) => format!(", {f} failed ({listed} still listed)"),
            };
            let eta = match h.eta_seconds {
                Some(0) => String::new(),
                Some(s) => format!(", ETA {}", duration(s)),
                None => String::new(),
            };
            Line::Bar {
                label,
                percent: h.percent_objects,
                message: format!(
                    "{}: objects {}/{} ({:.1}%), bytes {}/{} ({:.1}%), {} copied, {} fixed, {} in place, {} skipped{failed}{eta}",
                    h.state,
                    h.objects_done,
                    h.objects_total,
                    h.percent_objects.unwrap_or(0.0),
                    bytes(h.bytes_done),
                    bytes(h.bytes_total),
                    h.percent_bytes.unwrap_or(0.0),
                    h.copied,
                    h.fixed,
                    h.in_place,
                    h.skipped,
                ),
            }
        }
    }
}

/// Where frames are drawn: indicatif bars on a terminal (redrawn in place by --watch),
/// plain lines otherwise.
struct Screen {
    terminal: bool,
    multi: MultiProgress,
    bars: Vec<(ProgressBar, Kind)>,
    last: Vec<Line>,
    alternate: bool,
}

/// xterm's alternate screen, cursor at the top left.
const ENTER_ALTERNATE_SCREEN: &str = "\x1b[?1049h\x1b[H";
const LEAVE_ALTERNATE_SCREEN: &str = "\x1b[?1049l";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Bar,
}

const BAR_WIDTH: usize = 30;

impl Screen {
    fn new(terminal: bool) -> Self {
        let target = if terminal {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            terminal,
            multi: MultiProgress::with_draw_target(target),
            bars: vec![],
            last: vec![],
            alternate: false,
        }
    }

    /// Prints a frame once, as text (alerts in red on a terminal).
    fn print(&self, lines: &[Line]) {
        for line in lines {
            match line {
                Line::Alert(_) if self.terminal => println!("\x1b[1;31m{}\x1b[0m", plain(line)),
                _ => println!("{}", plain(line)),
            }
        }
    }

    /// Draws a frame of --watch: in place on a terminal, one after the other elsewhere.
    fn show(&mut self, lines: &[Line]) {
        if !self.terminal {
            self.print(lines);
            println!();
            return;
        }
        self.last = lines.to_vec();
        if !self.alternate {
            // Like `watch` and `top`: frames are drawn on the alternate screen, so the
            // terminal's own `^C` echo cannot shift them, and the shell's screen gets
            // only the last frame, printed once on the way out.
            print!("{ENTER_ALTERNATE_SCREEN}");
            let _ = std::io::stdout().flush();
            self.alternate = true;
        }
        let kinds: Vec<Kind> = lines
            .iter()
            .map(|l| match l {
                Line::Bar { .. } => Kind::Bar,
                _ => Kind::Text,
            })
            .collect();
        if kinds != self.bars.iter().map(|(_, k)| *k).collect::<Vec<_>>() {
            // The layout changed (a rule came or went): start the drawing afresh.
            let _ = self.multi.clear();
            self.bars = kinds
                .iter()
                .map(|k| (self.multi.add(ProgressBar::new(1000)), *k))
                .collect();
        }
        for ((bar, _), line) in self.bars.iter().zip(lines) {
            match line {
                Line::Text(text) => {
                    bar.set_style(style("{msg}"));
                    // indicatif draws nothing for an empty line, which shifts the frame.
                    bar.set_message(if text.is_empty() {
                        " ".to_string()
                    } else {
                        text.clone()
                    });
                }
                Line::Alert(text) => {
                    bar.set_style(style("{msg:.red.bold}"));
                    bar.set_message(text.clone());
                }
                Line::Bar {
                    label,
                    percent,
                    message,
                } => {
                    bar.set_style(style(&format!(
                        "{{prefix}} [{{bar:{BAR_WIDTH}.green/white}}] {{msg}}"
                    )));
                    bar.set_prefix(label.clone());
                    bar.set_position(percent.map_or(0, |p| (p * 10.0).round() as u64));
                    bar.set_message(message.clone());
                }
            }
        }
    }

    /// Stops drawing, leaves the alternate screen, and prints the last frame there.
    fn leave(&mut self) {
        if self.terminal && self.alternate {
            self.multi.set_draw_target(ProgressDrawTarget::hidden());
            print!("{LEAVE_ALTERNATE_SCREEN}");
            let _ = std::io::stdout().flush();
            self.alternate = false;
            self.print(&self.last);
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A line as plain text (pipes, files, CI logs).
fn plain(line: &Line) -> String {
    match line {
        Line::Text(text) => text.clone(),
        Line::Alert(text) => format!("! {}", text.trim_start()),
        Line::Bar {
            label,
            percent,
            message,
        } => {
            let filled = percent.map_or(0, |p| ((p / 100.0) * BAR_WIDTH as f64).floor() as usize);
            format!(
                "{label} [{}{}] {message}",
                "=".repeat(filled.min(BAR_WIDTH)),
                " ".repeat(BAR_WIDTH - filled.min(BAR_WIDTH))
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bars_fill_by_percent() {
        let line = Line::Bar {
            label: "  historical ".into(),
            percent: Some(50.0),
            message: "m".into(),
        };
        assert_eq!(
            plain(&line),
            format!("  historical  [{}{}] m", "=".repeat(15), " ".repeat(15))
        );
        assert_eq!(plain(&Line::Alert("  failed 2".into())), "! failed 2");
    }
}
