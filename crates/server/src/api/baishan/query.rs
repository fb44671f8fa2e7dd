//! The dialect's status queries: by task id, or by a time window in the dialect's zone, paged
//! by `page_number` and `page_size`, newest first, with the exact total.

use super::{AppState, BaishanError, param};
use crate::auth::Credential;
use cachectl_core::{ItemRecord, Kind, Page, PageRequest, TaskId, Timestamp};
use chrono::{FixedOffset, NaiveDate, NaiveDateTime, TimeZone};

/// The longest time window of a query.
const MAX_SPAN_MS: i64 = 7 * 86_400_000;

/// The integer parameter `name` within `range`, or `default` when absent.
#[doc(hidden)]
pub fn parse_u32(
    pairs: &[(String, String)],
    name: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, BaishanError> {
    match param(pairs, &[name]) {
        None => Ok(default),
        Some(v) => v.trim().parse::<u32>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
            BaishanError::bad(format!("{name} must be an integer from {} to {}, not {v:?}", range.start(), range.end()))
        }),
    }
}

/// A `start_time`/`end_time` value: a whole day, or a second. Returns `[from, to)` in epoch ms.
#[doc(hidden)]
pub fn parse_time(text: &str, zone: FixedOffset, name: &str) -> Result<(Timestamp, Timestamp), BaishanError> {
    let t = text.trim();
    // `checked_add_signed`: the day after chrono's last one (year 262142) does not exist, and
    // adding to it panicked (found by fuzzing).
    let local = if let Ok(day) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        let start = day.and_hms_opt(0, 0, 0).unwrap_or_default();
        (start, start.checked_add_signed(chrono::Duration::days(1)))
    } else if let Ok(at) = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S") {
        (at, at.checked_add_signed(chrono::Duration::seconds(1)))
    } else {
        return Err(BaishanError::bad(format!("{name} must be YYYY-MM-DD or YYYY-MM-DD HH:MM:SS, not {text:?}")));
    };
    let to_ms = |naive: NaiveDateTime| {
        zone.from_local_datetime(&naive).single().map(|d| Timestamp::from_millis(d.timestamp_millis()))
    };
    match (to_ms(local.0), local.1.and_then(to_ms)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(BaishanError::bad(format!("{name} is out of range"))),
    }
}

pub(super) async fn query(
    state: &AppState,
    credential: &Credential,
    kind: Kind,
    pairs: &[(String, String)],
    now: Timestamp,
) -> Result<QueryPage, BaishanError> {
    let page_number = parse_u32(pairs, "page_number", 1, 1..=u32::MAX)?;
    let page_size = parse_u32(pairs, "page_size", 50, 1..=500)?;
    let page = PageRequest { number: page_number, size: page_size };
    let task_id = param(pairs, &["task_id"]);
    let start = param(pairs, &["start_time"]);
    let end = param(pairs, &["end_time"]);
    let result: Page<ItemRecord> = match (task_id, start, end) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(BaishanError::bad(
                "task_id and start_time/end_time are two exclusive ways to query; give one of them",
            ));
        }
        (None, None, None) => {
            return Err(BaishanError::bad("give either task_id, or start_time and end_time"));
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(BaishanError::bad("start_time and end_time must be given together"));
        }
        (Some(id), None, None) => {
            let id = TaskId::parse(id.trim())
                .ok_or_else(|| BaishanError::bad(format!("task_id must be a positive integer, not {id:?}")))?;
            state.service.task_items(&credential.account, kind, id, page).await?
        }
        (None, Some(start), Some(end)) => {
            let zone = state.settings.timezone;
            let (from, _) = parse_time(start, zone, "start_time")?;
            let (_, to) = parse_time(end, zone, "end_time")?;
            if to <= from {
                return Err(BaishanError::bad("end_time is before start_time"));
            }
            if to.millis_since(from) > MAX_SPAN_MS {
                return Err(BaishanError::bad("the time range spans more than 7 days"));
            }
            // Records past the retention are gone, even before the sweep has deleted them.
            let oldest = now.plus_millis(-i64::from(state.settings.retention.days) * 86_400_000);
            let url = param(pairs, &["url", "urls"]).map(normalize_url);
            if to <= oldest {
                Page { total: 0, records: Vec::new() }
            } else {
                state
                    .service
                    .window_items(&credential.account, kind, (from.max(oldest), to), url.as_deref(), page)
                    .await?
            }
        }
    };
    let zone = state.settings.timezone;
    let list = result
        .records
        .into_iter()
        .map(|item| QueryRecord {
            id: item.id,
            item_type: item.item_type.as_str(),
            status: item.status.as_str(),
            create_time: Time(item.created_at, zone),
            complete_time: item.finished_at.map(|t| Time(t, zone)),
            url: item.url,
        })
        .collect();
    // The refresh seed prints page_number as a string, the prefetch seed as a number.
    let page_number =
        if kind == Kind::Refresh { PageNumber::Text(page_number) } else { PageNumber::Number(page_number) };
    Ok(QueryPage { total: result.total, page_number, list })
}

/// A page of query results, serialized straight from the items.
#[derive(serde::Serialize)]
pub(super) struct QueryPage {
    total: u64,
    page_number: PageNumber,
    list: Vec<QueryRecord>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum PageNumber {
    #[serde(serialize_with = "serialize_display")]
    Text(u32),
    Number(u32),
}

#[derive(serde::Serialize)]
struct QueryRecord {
    /// The item id, as a string.
    #[serde(serialize_with = "serialize_display")]
    id: i64,
    #[serde(rename = "type")]
    item_type: &'static str,
    status: &'static str,
    create_time: Time,
    /// `""` until the item is final.
    #[serde(serialize_with = "serialize_optional_time")]
    complete_time: Option<Time>,
    url: String,
}

fn serialize_display<S: serde::Serializer>(value: &impl std::fmt::Display, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn serialize_optional_time<S: serde::Serializer>(time: &Option<Time>, serializer: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => serializer.collect_str(t),
        None => serializer.serialize_str(""),
    }
}

/// A time written `YYYY-MM-DD HH:MM:SS` in the dialect's zone.
struct Time(Timestamp, FixedOffset);

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1.timestamp_millis_opt(self.0.millis()).single() {
            Some(t) => crate::wire::write_datetime(f, &t, b' '),
            None => Ok(()),
        }
    }
}

impl serde::Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = crate::wire::instant_text(self.0, self.1, b' ');
        match text.as_ref().and_then(|t| std::str::from_utf8(t).ok()) {
            Some(text) => serializer.serialize_str(text),
            None => serializer.collect_str(self),
        }
    }
}

/// A queried URL normalized as submitted URLs are (lowercase host, no fragment), so that it
/// finds its records; an unparsable one is looked up as it is (and finds nothing).
#[doc(hidden)]
pub fn normalize_url(raw: &str) -> String {
    url::Url::parse(raw.trim()).map_or_else(
        |_| raw.to_owned(),
        |mut u| {
            u.set_fragment(None);
            u.to_string()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_days_or_seconds_of_the_zone() {
        let zone = FixedOffset::east_opt(8 * 3600).unwrap();
        let (a, b) = parse_time("2018-02-23", zone, "start_time").unwrap();
        assert_eq!(b.millis_since(a), 86_400_000);
        assert_eq!(Time(a, zone).to_string(), "2018-02-23 00:00:00");
        let (a, b) = parse_time("2018-02-23 10:11:12", zone, "start_time").unwrap();
        assert_eq!(b.millis_since(a), 1000);
        assert_eq!(Time(a, zone).to_string(), "2018-02-23 10:11:12");
        assert!(parse_time("2018-02-30", zone, "start_time").is_err());
        assert!(parse_time("yesterday", zone, "start_time").is_err());
        assert!(parse_time("+262142-12-31", zone, "end_time").is_err(), "the last day has no end");
        assert!(parse_time("+262142-12-31 23:59:59", zone, "end_time").is_err());
    }
}
