//! Identifiers: the exchange's order ids, the client's order ids, accounts.

use crate::error::{ErrorCode, ValidationError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The exchange's id of an order, assigned by the order-gateway. Unique for the life of a lab;
/// engine, persistence and audit key on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(pub u64);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Checks the shape shared by client order ids and accounts: 1 to 64 characters of
/// `A-Z a-z 0-9 . _ : -`, so they are safe in logs, URLs and SQL text.
fn check_token(field: &str, what: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(
            field,
            ErrorCode::Missing,
            format!("{what} must not be empty"),
        ));
    }
    let ok = s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            ErrorCode::Malformed,
            format!("{what} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"),
        ))
    }
}

/// The client's own id for an order: the idempotency key of `POST /v1/orders`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientOrderId(String);

impl ClientOrderId {
    pub fn parse(field: &str, s: &str) -> Result<ClientOrderId, ValidationError> {
        check_token(field, "client_order_id", s)?;
        Ok(ClientOrderId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientOrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A trading account. Orders of the same account never trade with each other (self-trade
/// prevention, see the matching engine).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Account(String);

impl Account {
    pub fn parse(field: &str, s: &str) -> Result<Account, ValidationError> {
        check_token(field, "account", s)?;
        Ok(Account(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The account's compact key for the order book: FNV-1a over its bytes. Stable across
    /// versions and runs (the book hash depends on it). Two accounts colliding on 64 bits would
    /// only make them unable to trade with each other.
    pub fn key(&self) -> AccountKey {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // 0 is reserved for "no account".
        AccountKey(h.max(1))
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An account as the order book sees it. `AccountKey::NONE` never self-trades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountKey(pub u64);

impl AccountKey {
    pub const NONE: AccountKey = AccountKey(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(ClientOrderId::parse("client_order_id", "c-1").is_ok());
        assert!(ClientOrderId::parse("client_order_id", "lg:42.7_x").is_ok());
        let e = ClientOrderId::parse("client_order_id", "").unwrap_err();
        assert_eq!(e.code, ErrorCode::Missing);
        let e = ClientOrderId::parse("client_order_id", "a b").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.code),
            ("client_order_id", ErrorCode::Malformed)
        );
        assert!(Account::parse("account", &"x".repeat(65)).is_err());
    }

    #[test]
    fn account_keys_are_stable_and_never_none() {
        let a = Account::parse("account", "acct-1").unwrap();
        assert_eq!(a.key(), a.clone().key());
        assert_ne!(a.key(), AccountKey::NONE);
        // Pinned: the book hash of a journal written today must match after an upgrade.
        assert_eq!(a.key(), AccountKey(0xeadd_80bd_b5b1_6dfc));
    }
}
