//! The server-rendered pages: plain HTML with a little inline script that calls the JSON API (no build
//! step). `/` lists products and orders and has a form per command; `/demo` fires sequential reads and
//! shows which store served each; `/sync` compares every store with PostgreSQL.

use axum::response::Html;

const STYLE: &str = include_str!("pages/style.css");

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · cdc-cqrs</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style></head>\
         <body><nav><b>cdc-cqrs</b> <a href=\"/\">home</a> <a href=\"/demo\">read stores demo</a> \
         <a href=\"/sync\">sync check</a></nav>{body}</body></html>"
    ))
}

pub async fn home() -> Html<String> {
    page("home", include_str!("pages/home.html"))
}

pub async fn demo() -> Html<String> {
    page("read stores demo", include_str!("pages/demo.html"))
}

pub async fn sync() -> Html<String> {
    page("sync check", include_str!("pages/sync.html"))
}
