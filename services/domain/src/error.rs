//! Validation errors that name the field at fault.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A machine-readable class of validation failure; the gateway puts it in `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A required field is absent.
    Missing,
    /// The value does not parse as what the field holds (a price that is not a decimal, ...).
    Malformed,
    /// The value parses but is outside the allowed range (zero quantity, negative price, ...).
    OutOfRange,
    /// A price that is not a whole number of ticks.
    OffTickGrid,
    /// A quantity that is not a whole number of lots.
    OffLotGrid,
    /// A symbol the exchange does not list.
    UnknownSymbol,
    /// Fields that are each valid but contradict each other (a market order with a price, ...).
    Conflict,
}

impl ErrorCode {
    /// The `snake_case` name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Missing => "missing",
            ErrorCode::Malformed => "malformed",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::OffTickGrid => "off_tick_grid",
            ErrorCode::OffLotGrid => "off_lot_grid",
            ErrorCode::UnknownSymbol => "unknown_symbol",
            ErrorCode::Conflict => "conflict",
        }
    }
}

/// Why a value was refused, and which field it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationError {
    /// The wire name of the offending field (`"price"`, `"quantity"`, ...).
    pub field: String,
    pub code: ErrorCode,
    /// A sentence a person can act on.
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.field,
            self.message,
            self.code.as_str()
        )
    }
}

impl std::error::Error for ValidationError {}
