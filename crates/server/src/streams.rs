//! How many progress streams (Server-Sent Events: the native API's `/api/v1/tasks/{id}/events`
//! and the console's `/console/tasks/{id}/events`) each account holds open at once. Each open
//! stream reads the store several times a second until its task is final, so without a cap one
//! account could hold up to `[server] max_connections` of them and load the store for everyone;
//! past `[server] max_streams_per_account` a new one is refused (429) until one of the account's
//! streams ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The open streams of every account, counted against one limit.
#[derive(Debug)]
pub struct StreamSlots {
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl StreamSlots {
    /// At most `limit` open streams per account.
    #[must_use]
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, open: Mutex::new(HashMap::new()) })
    }

    /// The limit per account.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for one more stream of `account`, or `None` when it holds `limit` already. The slot
    /// is given back when it is dropped (the stream ended or its client went away).
    #[must_use]
    pub fn try_open(self: &Arc<Self>, account: &str) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(account.to_owned()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(StreamSlot { slots: self.clone(), account: account.to_owned() })
    }

    /// How many streams `account` holds open.
    #[must_use]
    pub fn open(&self, account: &str) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(account).copied().unwrap_or(0)
    }
}

/// One open stream of an account; dropping it gives the slot back.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    account: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.account) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.account);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_holds_at_most_the_limit_and_a_dropped_slot_is_given_back() {
        let slots = StreamSlots::new(2);
        let a = slots.try_open("acme").unwrap();
        let b = slots.try_open("acme").unwrap();
        assert!(slots.try_open("acme").is_none(), "a third is refused");
        let other = slots.try_open("other").expect("another account has its own slots");
        assert_eq!((slots.open("acme"), slots.open("other")), (2, 1));
        drop(a);
        let c = slots.try_open("acme").expect("a dropped slot is given back");
        drop((b, c, other));
        assert_eq!((slots.open("acme"), slots.open("other")), (0, 0));
        assert!(slots.open.lock().unwrap().is_empty(), "accounts without streams are forgotten");
    }
}
