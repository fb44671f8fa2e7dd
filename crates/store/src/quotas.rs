//! Daily quotas: what a task charges, in the transaction that stores it, and what is spent.

use crate::sql::{Db, Sql, SqlWriter as _};
use cachectl_core::{AccountName, QuotaDay};
use cachectl_core::{QuotaBucket, QuotaCharge, StoreError, StoreResult};

/// Adds `?4` to quota `?2` of account `?1` on day `?3`, unless that takes it beyond `?5`: a
/// conditional upsert, whose row lock serializes concurrent submissions (several instances on
/// PostgreSQL), which together can never spend more than the limit. Returns the new amount, or
/// no row when the limit would be exceeded.
const CHARGE: &str = "INSERT INTO quota_usage (account, bucket, day, used) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (account, bucket, day) DO UPDATE SET used = quota_usage.used + excluded.used \
     WHERE quota_usage.used + excluded.used <= ?5 RETURNING used";

/// How much of quota `?2` account `?1` spent on day `?3`.
const USED: &str = "SELECT used FROM quota_usage WHERE account = ?1 AND bucket = ?2 AND day = ?3";

/// Charges `charges` to `account` on `conn` (a transaction); on the first that would exceed its
/// limit, fails with what is spent already, and the caller rolls back.
pub(crate) async fn charge<DB: Db>(
    conn: &mut DB::Connection,
    account: &AccountName,
    charges: &[QuotaCharge],
) -> StoreResult<()> {
    for charge in charges {
        let amount = i64::try_from(charge.amount).unwrap_or(i64::MAX);
        let limit = i64::try_from(charge.limit).unwrap_or(i64::MAX);
        let charged = if amount > limit {
            None
        } else {
            let args =
                [account.into(), charge.bucket.as_str().into(), (&charge.day).into(), amount.into(), limit.into()];
            Sql::<DB>::new().template(CHARGE, &args).row(conn).await?
        };
        if charged.is_none() {
            let used = used::<DB>(conn, account, charge.bucket, &charge.day).await?;
            return Err(StoreError::QuotaExceeded { bucket: charge.bucket, used, limit: charge.limit });
        }
    }
    Ok(())
}

/// How much of quota `bucket` `account` spent on `day`.
pub(crate) async fn used<DB: Db>(
    conn: &mut DB::Connection,
    account: &AccountName,
    bucket: QuotaBucket,
    day: &QuotaDay,
) -> StoreResult<u64> {
    let row = Sql::<DB>::new().template(USED, &[account.into(), bucket.as_str().into(), day.into()]).row(conn).await?;
    Ok(row.map_or(0, |row| u64::try_from(DB::int(&row, 0)).unwrap_or(0)))
}
