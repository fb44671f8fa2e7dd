//! The dialects' record pages: a task's items and a window's items, newest first with their exact
//! total (Baishan), and the keyset-paged records of the Baidu dialects. Each backend reads them
//! its own way (`Backend::task_items`, `window_items`, `records`): SQLite on the reader threads
//! of `sqlite_read` with the statements of `records::sqlite`, PostgreSQL on its own pool with
//! those of `records::postgres`. Both take a window's exact total from the hourly counters
//! (`counters::write_window_total`).

pub(crate) mod postgres;
pub(crate) mod sqlite;
