//! Mapping between rows and domain types, shared by the backends. Values the store wrote itself
//! are trusted; an unknown enum name (a newer writer) degrades to a safe default instead of panicking.

use crate::sql::{Db, Get as _};
use cachectl_core::{Item, ItemRecord, ItemStatus, ItemType, Kind, NodeResult, NodeState, TaskId, Timestamp};

/// The item columns every item query selects, in this order and together (`item_at` reads them
/// by position from the `id` column on).
pub(crate) const ITEM_COLUMNS: &str = "id, task_id, account, kind, url, host, item_type, status, progress, operator, \
     created_at, not_before, finished_at, reason, follows, depends_on, soft";

/// The columns of an `ItemRecord`, what the dialects' query pages read (`record_at` and
/// `sqlite_read::record_from_row` read them by position from the `id` column on).
pub(crate) const RECORD_COLUMNS: &str =
    "id, kind, url, item_type, status, progress, operator, created_at, not_before, finished_at, reason";

/// An item's stored enum names and progress decoded, shared by every row mapper: an unknown
/// name (a newer writer) becomes a safe default.
pub(crate) fn item_enums(kind: &str, item_type: &str, status: &str, progress: i64) -> (Kind, ItemType, ItemStatus, u8) {
    (
        kind.parse().unwrap_or(Kind::Refresh),
        item_type.parse().unwrap_or(ItemType::Url),
        status.parse().unwrap_or(ItemStatus::Processing),
        u8::try_from(progress.clamp(0, 100)).unwrap_or(0),
    )
}

/// An item from a row whose `ITEM_COLUMNS` start at its `id` column.
pub(crate) fn item_from_row<DB: Db>(row: &DB::Row) -> Item {
    item_at::<DB>(row, item_columns_at::<DB>(row))
}

/// Where the `ITEM_COLUMNS` (or `RECORD_COLUMNS`) of a result start: the position of its `id`
/// column, to look up once per result rather than once per row.
pub(crate) fn item_columns_at<DB: Db>(row: &DB::Row) -> usize {
    DB::position(row, "id").unwrap_or(0)
}

/// Where the columns of an `ItemRecord` stand among `ITEM_COLUMNS`.
const RECORD_IN_ITEM: [usize; 11] = [0, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13];

/// An item from the `ITEM_COLUMNS` of `row` that start at column `base`, by position: looking
/// each column up by name is a hash lookup and a name comparison per column and row (see
/// BENCHMARKS.md, "PostgreSQL row decoding").
pub(crate) fn item_at<DB: Db>(row: &DB::Row, base: usize) -> Item {
    let record = record_from::<DB>(row, RECORD_IN_ITEM.map(|column| base + column));
    Item {
        id: record.id,
        task_id: TaskId::new(DB::int(row, base + 1)),
        account: DB::text(row, base + 2),
        kind: record.kind,
        url: record.url,
        host: DB::text(row, base + 5),
        item_type: record.item_type,
        status: record.status,
        progress: record.progress,
        operator: record.operator,
        created_at: record.created_at,
        not_before: record.not_before,
        finished_at: record.finished_at,
        reason: record.reason,
        follows: DB::opt_int(row, base + 14),
        depends_on: DB::opt_int(row, base + 15),
        soft: DB::int(row, base + 16) != 0,
    }
}

/// An item record from the `RECORD_COLUMNS` of `row` that start at column `base`, by position,
/// as `item_at` reads an item. (SQLite's record pages are read through rusqlite.)
pub(crate) fn record_at<DB: Db>(row: &DB::Row, base: usize) -> ItemRecord {
    record_from::<DB>(row, std::array::from_fn(|column| base + column))
}

/// An item record from the columns of `row` at `at`, in the order of `RECORD_COLUMNS`.
fn record_from<DB: Db>(row: &DB::Row, at: [usize; 11]) -> ItemRecord {
    let (kind, item_type, status, progress) =
        item_enums(DB::str(row, at[1]), DB::str(row, at[3]), DB::str(row, at[4]), DB::int(row, at[5]));
    ItemRecord {
        id: DB::int(row, at[0]),
        kind,
        url: DB::text(row, at[2]),
        item_type,
        status,
        progress,
        operator: DB::text(row, at[6]),
        created_at: Timestamp::from_millis(DB::int(row, at[7])),
        not_before: Timestamp::from_millis(DB::int(row, at[8])),
        finished_at: DB::opt_int(row, at[9]).map(Timestamp::from_millis),
        reason: DB::opt_text(row, at[10]),
    }
}

/// A node result from a row of `node_results` columns, by name.
pub(crate) fn node_from_row<DB: Db>(row: &DB::Row) -> NodeResult {
    NodeResult {
        node: row.text("node"),
        state: row.text("state").parse().unwrap_or(NodeState::Pending),
        attempts: u32::try_from(row.int("attempts")).unwrap_or(0),
        status_code: row.opt_int("status_code").and_then(|c| u16::try_from(c).ok()),
        error: row.opt_text("error"),
        updated_at: row.time("updated_at"),
        instance: row.text("instance"),
    }
}
