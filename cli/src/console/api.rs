//! The console's JSON API. Each handler calls the function the matching CLI command
//! calls, and answers errors as `{"error": "<the CLI's one line>", "field": "<rule field>"}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crr_shared::backfill::{BackfillSettings, BackfillStore, dry_run};
use crr_shared::dead_letter::{changes_of, is_for_bucket, peek, redrive};
use crr_shared::object_store::ObjectStore;
use crr_shared::rule::Rule;
use crr_shared::state::{RuleStore, StatsStore};
use crr_shared::verify::{VerifyOptions, verify};
use crr_shared::{Error, rule_admin};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Console;

type Shared = State<Arc<Console>>;
type Answer = Result<Json<Value>, ApiError>;

/// An error answer: the message, and the rule field it is about when there is one.
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "field": self.field })),
        )
            .into_response()
    }
}

pub fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/rules", post(create))
        .route("/api/plan", post(plan))
        .route("/api/rules/{id}", get(show).delete(delete))
        .route("/api/rules/{id}/pause", post(pause))
        .route("/api/rules/{id}/resume", post(resume))
        .route("/api/rules/{id}/backfill/start", post(backfill_start))
        .route("/api/rules/{id}/backfill/pause", post(backfill_pause))
        .route("/api/rules/{id}/failures", get(failures))
        .route("/api/rules/{id}/suppressed", get(suppressed))
        .route("/api/rules/{id}/dead-letters", get(dead_letters))
        .route("/api/rules/{id}/redrive", post(redrive_rule))
        .route("/api/rules/{id}/verify", get(verify_stream))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page or API".into(), None) })
}

pub fn error(status: StatusCode, message: String, field: Option<String>) -> ApiError {
    ApiError {
        status,
        message,
        field,
    }
}

/// The error and its causes on one line, joined as the CLI prints them.
fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn failed(err: Error) -> ApiError {
    let status = match &err {
        Error::RuleNotFound(_) => StatusCode::NOT_FOUND,
        Error::RuleExists(_) | Error::BucketClaimed { .. } => StatusCode::CONFLICT,
        Error::InvalidRule { .. }
        | Error::BadRequest(_)
        | Error::BucketNotAllowed { .. }
        | Error::EndpointNotAllowed { .. } => StatusCode::BAD_REQUEST,
        e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(status, one_line(&err), err.rule_field())
}

fn anyhow_failed(err: anyhow::Error) -> ApiError {
    match err.downcast::<Error>() {
        Ok(e) => failed(e),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            error(StatusCode::BAD_REQUEST, chain.join(": "), None)
        }
    }
}

fn ok(value: impl serde::Serialize) -> Answer {
    serde_json::to_value(value)
        .map(Json)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))
}

async fn rule_of(console: &Console, id: &str) -> Result<Rule, ApiError> {
    console
        .state
        .get_rule(id)
        .await
        .map_err(failed)?
        .ok_or_else(|| failed(Error::RuleNotFound(id.to_string())))
}

/// `crr status [RULE] --json [--series W]`: every rule, or `?rule=ID`, with the rule's
/// per-minute activity when `&series=1h|6h|24h`.
async fn status(State(console): Shared, Query(q): Query<HashMap<String, String>>) -> Answer {
    let rule = q.get("rule").map(String::as_str);
    let window = match q.get("series") {
        Some(_) if rule.is_none() => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "a series is per rule: give rule=ID with series".into(),
                None,
            ));
        }
        Some(w) => Some(crr_shared::series::Window::parse(w).map_err(failed)?),
        None => None,
    };
    let report = console
        .status
        .report_with(rule, window)
        .await
        .map_err(failed)?;
    let mut value = serde_json::to_value(&report)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))?;
    value["table"] = json!(console.state.table());
    value["queue_watched"] = json!(console.queue.queue_url.is_some());
    value["dlq_watched"] = json!(console.queue.dlq_url.is_some());
    Ok(Json(value))
}

/// `crr rule show ID --json`.
async fn show(State(console): Shared, Path(id): Path<String>) -> Answer {
    ok(rule_of(&console, &id).await?)
}

/// `crr rule create`: the same validation, deployment checks and claim transaction.
async fn create(
    State(console): Shared,
    body: Result<Json<Rule>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(rule) = body.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text(), None))?;
    let options = rule_admin::CreateOptions {
        force: false,
        fallback: Some(crate::deployment_cmd::fallback().map_err(anyhow_failed)?),
    };
    let created = rule_admin::create_rule_with(&*console.state, &console.s3, rule, &options)
        .await
        .map_err(failed)?;
    ok(json!({ "rule": created.rule, "warnings": created.warnings }))
}

/// `crr backfill plan`, for a rule not created yet: what the historical sync would copy
/// and which target objects it would overwrite.
async fn plan(
    State(console): Shared,
    body: Result<Json<Rule>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(rule) = body.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text(), None))?;
    rule.validate().map_err(failed)?;
    crate::deployment_cmd::check_endpoints(&console.state, &rule)
        .await
        .map_err(anyhow_failed)?;
    let source = console.s3.store(&rule.source);
    let target = console.s3.store(&rule.target);
    let report = dry_run(
        &rule,
        &source as &dyn ObjectStore,
        &target as &dyn ObjectStore,
        1000,
    )
    .await
    .map_err(failed)?;
    ok(report)
}

#[derive(Deserialize)]
struct Confirm {
    confirm: String,
}

/// `crr rule delete ID`, once the page has the rule's id typed back.
async fn delete(
    State(console): Shared,
    Path(id): Path<String>,
    body: Result<Json<Confirm>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(confirm) = body.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text(), None))?;
    if confirm.confirm != id {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("type the rule id '{id}' to confirm its deletion"),
            Some("confirm".into()),
        ));
    }
    let fallback = crate::deployment_cmd::fallback().map_err(anyhow_failed)?;
    let rule = rule_admin::delete_rule_with(&*console.state, &console.s3, &id, Some(fallback))
        .await
        .map_err(failed)?;
    ok(json!({ "deleted": rule.id }))
}

async fn pause(State(console): Shared, Path(id): Path<String>) -> Answer {
    ok(rule_admin::set_paused(&*console.state, &id, true)
        .await
        .map_err(failed)?)
}

async fn resume(State(console): Shared, Path(id): Path<String>) -> Answer {
    ok(rule_admin::set_paused(&*console.state, &id, false)
        .await
        .map_err(failed)?)
}

fn backfiller(console: &Console) -> Result<crr_shared::backfill::Backfiller, ApiError> {
    crate::backfill_cmd::backfiller(
        console.state.clone(),
        console.s3.clone(),
        BackfillSettings::default(),
    )
    .map_err(failed)
}

/// `crr backfill start ID`.
async fn backfill_start(State(console): Shared, Path(id): Path<String>) -> Answer {
    let job = backfiller(&console)?.start(&id).await.map_err(failed)?;
    ok(json!({ "state": job.state.as_str() }))
}

/// `crr backfill pause ID`.
async fn backfill_pause(State(console): Shared, Path(id): Path<String>) -> Answer {
    backfiller(&console)?.pause(&id).await.map_err(failed)?;
    ok(json!({ "state": "paused" }))
}

/// `crr backfill failures ID --json`.
async fn failures(State(console): Shared, Path(id): Path<String>) -> Answer {
    rule_of(&console, &id).await?;
    ok(console.state.failures(&id).await.map_err(failed)?)
}

/// `crr suppressed ID --json`.
async fn suppressed(State(console): Shared, Path(id): Path<String>) -> Answer {
    rule_of(&console, &id).await?;
    ok(console.state.suppressed(&id).await.map_err(failed)?)
}

/// The rule's events in the dead-letter queue, with their reasons (read, not moved).
async fn dead_letters(State(console): Shared, Path(id): Path<String>) -> Answer {
    let rule = rule_of(&console, &id).await?;
    let Some(dlq) = console.queue.dlq_url.clone() else {
        return ok(json!({ "watched": false, "letters": [] }));
    };
    let sqs = console.queue.sqs_client(&console.sdk, &dlq);
    let letters = peek(&sqs, &dlq, 100).await.map_err(failed)?;
    let mine: Vec<Value> = letters
        .iter()
        .filter(|l| is_for_bucket(l, &rule.source.bucket))
        .map(|l| {
            json!({
                "message_id": l.message_id,
                "reason": l.reason,
                "kind": l.kind,
                "receive_count": l.receive_count,
                "keys": changes_of(l).into_iter().map(|(_, k)| k).collect::<Vec<_>>(),
            })
        })
        .collect();
    ok(json!({ "watched": true, "letters": mine }))
}

/// `crr redrive --rule ID`.
async fn redrive_rule(State(console): Shared, Path(id): Path<String>) -> Answer {
    let rule = rule_of(&console, &id).await?;
    let (queue_url, dlq_url) = console.queue.both().map_err(anyhow_failed)?;
    let sqs = console.queue.sqs_client(&console.sdk, queue_url);
    let report = redrive(&sqs, dlq_url, queue_url, 1000, |l| {
        is_for_bucket(l, &rule.source.bucket)
    })
    .await
    .map_err(failed)?;
    ok(json!({ "moved": report.moved, "kept": report.kept }))
}

/// `crr verify ID --json` as server-sent events: `drift` for each difference as it is
/// found, `progress` now and then, then `summary` (or `failed`).
async fn verify_stream(
    State(console): Shared,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let rule = rule_of(&console, &id).await?;
    crate::deployment_cmd::check_endpoints(&console.state, &rule)
        .await
        .map_err(anyhow_failed)?;
    let options = VerifyOptions {
        checksum: q.get("checksum").is_some_and(|v| v == "true"),
        ..VerifyOptions::default()
    };
    let source: Arc<dyn ObjectStore> = Arc::new(console.s3.store(&rule.source));
    let target: Arc<dyn ObjectStore> = Arc::new(console.s3.store(&rule.target));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let task = tokio::spawn(async move {
        let drift_tx = tx.clone();
        let progress_tx = tx.clone();
        let mut last_progress = std::time::Instant::now();
        let result = verify(
            &rule,
            source,
            target,
            &options,
            |drift| {
                let _ = drift_tx.send(
                    Event::default()
                        .event("drift")
                        .data(serde_json::to_string(drift).unwrap_or_default()),
                );
            },
            |p| {
                if last_progress.elapsed().as_millis() >= 250 {
                    last_progress = std::time::Instant::now();
                    let _ = progress_tx.send(
                        Event::default().event("progress").data(
                            json!({
                                "listed_source": p.listed_source,
                                "listed_target": p.listed_target,
                                "compared": p.compared,
                            })
                            .to_string(),
                        ),
                    );
                }
            },
        )
        .await;
        let last = match result {
            Ok(summary) => Event::default()
                .event("summary")
                .data(serde_json::to_string(&summary).unwrap_or_default()),
            Err(e) => Event::default()
                .event("failed")
                .data(json!({ "error": one_line(&e) }).to_string()),
        };
        let _ = tx.send(last);
    });
    // A page that goes away (closed, reloaded) stops the comparison: the stream owns
    // the task's abort handle.
    let guard = AbortOnDrop(task.abort_handle());
    let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|event| (Ok(event), (rx, guard)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
