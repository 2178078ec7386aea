//! `crr status --watch` in a real terminal (tmux): it draws the progress bars and the
//! real-time table, redraws in place, and exits cleanly on Ctrl-C (status 0, the last
//! frame left on the shell's screen, once).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crr_shared::backfill::{BackfillSettings, Backfiller};
use crr_shared::copy::CopyEngine;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_tests::{Stack, bin, rule, seed, unique};

/// A tmux server of the test's own (own socket), killed by its PID when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket, "-f", "/dev/null"]);
        cmd
    }

    fn screen(&self) -> Result<String> {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "crr"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits for the screen to satisfy `ok`; returns it.
    fn wait_screen(&self, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
        let start = Instant::now();
        loop {
            let screen = self.screen()?;
            if ok(&screen) {
                return Ok(screen);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("timed out waiting for {what}; the screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if let Ok(out) = self
            .cmd()
            .args(["display-message", "-p", "#{pid}"])
            .output()
            && let Ok(pid) = String::from_utf8_lossy(&out.stdout).trim().parse::<i32>()
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn header_line(screen: &str) -> String {
    screen
        .lines()
        .find(|l| l.starts_with("crr status at"))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn status_watch_draws_bars_redraws_and_exits_cleanly_on_ctrl_c() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("term");
    let state = Arc::new(stack.state(&table).await?);
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let objects = (0..12)
        .map(|i| (format!("old/{i:02}"), vec![b'x'; 1000 + i]))
        .collect();
    seed(&stack, &stack.a, &source, objects, 4).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.historical = true;
    r.notify = Notify::External;
    let r = create_rule(state.as_ref(), &stack.s3_clients(), r).await?;
    let backfiller = Backfiller::new(
        state.clone(),
        state.clone(),
        Arc::new(stack.s3_clients()),
        CopyEngine::default(),
        BackfillSettings::default(),
    );
    backfiller.start(&r.id).await?;
    backfiller
        .run(
            Some(&r.id),
            "terminal-test",
            Instant::now() + Duration::from_secs(60),
        )
        .await?;
    let queue = stack.create_queue(&stack.a, &unique("events"), 5).await?.0;

    let tmux = Tmux {
        socket: unique("crr-test-tmux"),
    };
    let crr = bin("crr")?;
    let shell = format!(
        "'{}' --table {table} status --watch --interval 0.5 --settle-secs 0 --queue-url {queue}; echo CRR-EXIT=$?; sleep 60",
        crr.display()
    );
    let started = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-s",
            "crr",
            "-x",
            "220",
            "-y",
            "20",
            &shell,
        ])
        .env("TERM", "xterm-256color")
        .env("AWS_REGION", &stack.a.region)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_ENDPOINT_URL_DYNAMODB", &stack.dynamodb)
        .env_remove("CRR_DLQ_URL")
        .status()
        .context("starting tmux")?;
    assert!(started.success());

    let rule_line = format!("rule {}:", r.id);
    let screen = tmux.wait_screen("the first frame", |s| {
        s.contains(&rule_line) && s.contains("historical")
    })?;
    println!("first frame:\n{screen}");
    assert!(screen.contains("real-time   caught up"), "{screen}");
    assert!(
        screen.contains(&format!(
            "historical  [{}] completed: objects 12/12 (100.0%)",
            "=".repeat(30)
        )),
        "{screen}"
    );
    assert!(screen.contains("queue: 0 waiting, 0 in flight"), "{screen}");
    // The watch redraws in place: a later frame, same layout, one header.
    let first = header_line(&screen);
    let later = tmux.wait_screen("a redraw", |s| {
        let h = header_line(s);
        !h.is_empty() && h != first
    })?;
    assert_eq!(later.matches("crr status at").count(), 1, "{later}");

    tmux.cmd()
        .args(["send-keys", "-t", "crr", "C-c"])
        .status()?;
    let end = tmux.wait_screen("the exit", |s| s.contains("CRR-EXIT="))?;
    println!("after Ctrl-C:\n{end}");
    std::fs::write(
        std::env::temp_dir().join("crr-status-watch-screen.txt"),
        &end,
    )?;
    assert!(end.contains("CRR-EXIT=0"), "{end}");
    assert!(end.contains(&rule_line), "the last frame stays: {end}");
    assert_eq!(
        end.matches("crr status at").count(),
        1,
        "one frame left: {end}"
    );
    assert!(!end.contains("panicked") && !end.contains("error"), "{end}");
    Ok(())
}
