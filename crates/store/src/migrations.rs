//! The schema migrations, embedded in the binary: `migrations/sqlite/` and `migrations/postgres/`,
//! applied by sqlx's migrator. They are listed here rather than read by sqlx's `migrate!` macro:
//! that macro alone pulled a second build of sqlx, its drivers and SQLite's C sources into
//! every build, as a compile-time dependency (about 200 CPU seconds of each clean build). A
//! test checks that the lists match the directories, file by file.

use cachectl_core::StoreError;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;
use std::pin::Pin;

/// A migration: version, description, SQL (what `migrate!` derives from a file named
/// `<version>_<description>.sql`, `_` read as a space in the description).
type Embedded = (i64, &'static str, &'static str);

const SQLITE: &[Embedded] = &[
    (1, "initial", include_str!("../migrations/sqlite/0001_initial.sql")),
    (2, "native", include_str!("../migrations/sqlite/0002_native.sql")),
    (3, "task index", include_str!("../migrations/sqlite/0003_task_index.sql")),
    (4, "purge kinds", include_str!("../migrations/sqlite/0004_purge_kinds.sql")),
    (5, "admin", include_str!("../migrations/sqlite/0005_admin.sql")),
];

const POSTGRES: &[Embedded] = &[
    (1, "initial", include_str!("../migrations/postgres/0001_initial.sql")),
    (2, "native", include_str!("../migrations/postgres/0002_native.sql")),
    (3, "purge kinds", include_str!("../migrations/postgres/0003_purge_kinds.sql")),
    (4, "admin", include_str!("../migrations/postgres/0004_admin.sql")),
];

#[derive(Debug)]
struct Source(&'static [Embedded]);

impl MigrationSource<'static> for Source {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|&(version, description, sql)| {
                    // The checksum (SHA-384 of the SQL) is what databases migrated by earlier
                    // builds recorded: the same text gives the same checksum.
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

async fn migrator(list: &'static [Embedded]) -> Result<Migrator, StoreError> {
    Migrator::new(Source(list)).await.map_err(|e| StoreError::Schema(e.to_string()))
}

/// SQLite's migrations.
pub(crate) async fn sqlite() -> Result<Migrator, StoreError> {
    migrator(SQLITE).await
}

/// PostgreSQL's migrations.
pub(crate) async fn postgres() -> Result<Migrator, StoreError> {
    migrator(POSTGRES).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each list holds every file of its directory, in order, with the version and description its
    /// name gives and the file's text.
    #[test]
    fn the_lists_match_the_migration_directories() {
        for (dir, list) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(dir);
            let mut files: Vec<_> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            assert_eq!(files.len(), list.len(), "{dir}: {files:?}");
            for (file, &(version, description, sql)) in files.iter().zip(list) {
                let name = file.file_name().unwrap().to_str().unwrap();
                let (number, rest) = name.strip_suffix(".sql").unwrap().split_once('_').unwrap();
                assert_eq!(number.parse::<i64>().unwrap(), version, "{name}");
                assert_eq!(rest.replace('_', " "), description, "{name}");
                assert_eq!(std::fs::read_to_string(file).unwrap(), sql, "{name}");
            }
        }
    }
}
