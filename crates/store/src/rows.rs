//! Mapping between rows and domain types, shared by the backends. Values the store wrote itself
//! are trusted; an unknown enum name (a newer writer) degrades to a safe default instead of panicking.

use cachectl_core::{Item, ItemRecord, ItemStatus, ItemType, Kind, NodeResult, NodeState};
use sqlx::Row;

/// The item columns every item query selects, in this order and together (`item_at` reads them
/// by position from the `id` column on).
pub(crate) const ITEM_COLUMNS: &str = "id, task_id, account, kind, url, host, item_type, status, progress, operator, created_at, not_before, finished_at, reason, follows, depends_on";

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

/// The row mappers for one backend's row type (the column types are the same on both).
macro_rules! mappers {
    ($module:ident, $row:ty) => {
        pub(crate) mod $module {
            use super::*;

            /// An item from a row whose `ITEM_COLUMNS` start at its `id` column.
            pub(crate) fn item_from_row(row: &$row) -> Item {
                item_at(row, item_columns_at(row))
            }

            /// Where the `ITEM_COLUMNS` of a result start: the position of its `id` column, to
            /// look up once per result rather than once per row.
            pub(crate) fn item_columns_at(row: &$row) -> usize {
                use sqlx::Column as _;
                row.try_column("id").map_or(0, |c| c.ordinal())
            }

            /// An item from the `ITEM_COLUMNS` of `row` that start at column `base`, by
            /// position. The profile of a PostgreSQL page put a fifth of the server's time in
            /// building items from rows, part of it looking each column up by name (a hash
            /// lookup and a name comparison per column and row); by position, and without the
            /// type check (`at`), only the decoding remains.
            pub(crate) fn item_at(row: &$row, base: usize) -> Item {
                let (kind, item_type, status, progress) = item_enums(
                    at::<&str>(row, base + 3),
                    at::<&str>(row, base + 6),
                    at::<&str>(row, base + 7),
                    at(row, base + 8),
                );
                Item {
                    id: at(row, base),
                    task_id: at(row, base + 1),
                    account: at(row, base + 2),
                    kind,
                    url: at(row, base + 4),
                    host: at(row, base + 5),
                    item_type,
                    status,
                    progress,
                    operator: at(row, base + 9),
                    created_at: at(row, base + 10),
                    not_before: at(row, base + 11),
                    finished_at: at(row, base + 12),
                    reason: at(row, base + 13),
                    follows: at(row, base + 14),
                    depends_on: at(row, base + 15),
                }
            }

            /// The column at `index` decoded without sqlx's check that its database type suits
            /// `T` (a comparison of type descriptions per value, with their clone and drop,
            /// about a fifth of decoding a page on PostgreSQL): the columns are `ITEM_COLUMNS` of
            /// the store's own schema. A value that does not decode is read again through the
            /// checked `get`, which panics with sqlx's message as before.
            pub(crate) fn at<'r, T>(row: &'r $row, index: usize) -> T
            where
                T: sqlx::Decode<'r, <$row as sqlx::Row>::Database> + sqlx::Type<<$row as sqlx::Row>::Database>,
            {
                row.try_get_unchecked(index).unwrap_or_else(|_| row.get(index))
            }

            pub(crate) fn node_from_row(row: &$row) -> NodeResult {
                let state: String = row.get("state");
                let attempts: i64 = row.get("attempts");
                let code: Option<i64> = row.get("status_code");
                NodeResult {
                    node: row.get("node"),
                    state: state.parse().unwrap_or(NodeState::Pending),
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    status_code: code.and_then(|c| u16::try_from(c).ok()),
                    error: row.get("error"),
                    updated_at: row.get("updated_at"),
                    instance: row.get("instance"),
                }
            }
        }
    };
}

mappers!(sqlite, sqlx::sqlite::SqliteRow);
mappers!(postgres, sqlx::postgres::PgRow);

/// An item record from the `RECORD_COLUMNS` of a PostgreSQL row that start at column `base`, by
/// position, as `item_at` reads an item. (SQLite's record pages are read through rusqlite.)
pub(crate) fn record_at(row: &sqlx::postgres::PgRow, base: usize) -> ItemRecord {
    use postgres::at;
    let (kind, item_type, status, progress) =
        item_enums(at::<&str>(row, base + 1), at::<&str>(row, base + 3), at::<&str>(row, base + 4), at(row, base + 5));
    ItemRecord {
        id: at(row, base),
        kind,
        url: at(row, base + 2),
        item_type,
        status,
        progress,
        operator: at(row, base + 6),
        created_at: at(row, base + 7),
        not_before: at(row, base + 8),
        finished_at: at(row, base + 9),
        reason: at(row, base + 10),
    }
}
