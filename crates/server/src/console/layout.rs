//! The console's page frame (head, navigation, sign-out form) and small shared pieces: status
//! words and times. Everything is rendered by maud, which escapes every value it inserts.

use super::session::SignedIn;
use cachectl_core::Timestamp;
use maud::{DOCTYPE, Markup, html};

/// A page to render.
pub struct Page<'a> {
    /// The `<title>` and the navigation's current entry.
    pub title: &'a str,
    /// The signed-in caller, for the navigation and the sign-out form.
    pub signed_in: Option<&'a SignedIn>,
    /// The page's content.
    pub body: Markup,
}

/// The whole HTML document of a page.
pub fn page(p: &Page<'_>) -> axum::response::Html<String> {
    axum::response::Html(document(p).into_string())
}

fn document(p: &Page<'_>) -> Markup {
    let entries =
        [("/console/", "Overview"), ("/console/submit", "Refresh / prefetch"), ("/console/records", "Records")];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (p.title) " · cachectl console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/console/" { "cachectl" }
                    @if let Some(s) = p.signed_in {
                        nav aria-label="Main" {
                            @for (href, name) in entries {
                                a href=(href) aria-current=[(name == p.title).then_some("page")] { (name) }
                            }
                        }
                        form.signout method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(s.session.csrf);
                            span.who { (s.credential.account.name.as_str()) " (" (s.credential.operator) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (p.body) }
            }
        }
    }
}

/// A status as a word with a class for its colour, so that it reads without colour.
pub fn status(word: &str) -> Markup {
    html! { span class={ "status s-" (word) } { (word) } }
}

/// A time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.millis())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}
