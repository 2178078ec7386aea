//! The console's page, scripts and styles, compiled into the binary: no CDN, no build
//! step at run time.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::Console;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const CHARTS_JS: &str = include_str!("assets/charts.js");
const CHARTS_CSS: &str = include_str!("assets/charts.css");

/// A file of the console.
pub struct Asset {
    pub content_type: &'static str,
    pub body: String,
}

fn js(body: &str) -> Asset {
    Asset {
        content_type: "text/javascript; charset=utf-8",
        body: body.to_string(),
    }
}

fn css(body: &str) -> Asset {
    Asset {
        content_type: "text/css; charset=utf-8",
        body: body.to_string(),
    }
}

pub fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(|| async { js(APP_JS) }))
        .route("/assets/charts.js", get(|| async { js(CHARTS_JS) }))
        .route("/assets/app.css", get(|| async { css(APP_CSS) }))
        .route("/assets/charts.css", get(|| async { css(CHARTS_CSS) }))
}

/// The page, with this process's CSRF token and the table it shows.
async fn index(State(console): State<Arc<Console>>) -> Asset {
    Asset {
        content_type: "text/html; charset=utf-8",
        body: INDEX
            .replace("{{CSRF}}", &console.csrf)
            .replace("{{TABLE}}", &html_escape(console.state.table())),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
