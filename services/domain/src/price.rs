//! Symbols, their tick and lot sizes, and prices as integer ticks.
//!
//! A price on the wire is a decimal string (`"101.25"`). Inside the exchange it is a [`Price`]:
//! a whole number of the symbol's ticks. With a tick of `0.05`, `"101.25"` is 2025 ticks and
//! `"101.27"` is refused as off the grid. Floats never touch money.

use crate::error::{ErrorCode, ValidationError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A price as a whole number of ticks of its symbol. Always positive once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Price(pub i64);

impl Price {
    pub fn ticks(self) -> i64 {
        self.0
    }
}

/// A listed instrument's ticker, such as `AAPL`: 1 to 12 characters of `A-Z`, `0-9`, `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Symbol(String);

impl Symbol {
    /// Checks the ticker's shape (not whether it is listed: that is [`Catalog::get`]).
    pub fn parse(field: &str, s: &str) -> Result<Symbol, ValidationError> {
        let ok = !s.is_empty()
            && s.len() <= 12
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'.');
        if ok {
            Ok(Symbol(s.to_owned()))
        } else {
            Err(ValidationError::new(
                field,
                ErrorCode::Malformed,
                format!("symbol {s:?} must be 1 to 12 characters of A-Z, 0-9 and '.'"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a symbol trades: price precision, tick size and lot size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolSpec {
    pub symbol: Symbol,
    /// Digits after the decimal point that prices may carry (2 for cents).
    pub price_decimals: u8,
    /// Tick size in units of `10^-price_decimals` (1 with 2 decimals is a tick of 0.01).
    pub tick_units: u64,
    /// Quantities must be whole multiples of this many shares.
    pub lot_size: u64,
}

/// Largest price accepted, in units of `10^-price_decimals`: keeps every product of price and
/// quantity far from `i64` overflow.
const MAX_PRICE_UNITS: i64 = 1_000_000_000_000;

impl SymbolSpec {
    pub fn new(symbol: &str, price_decimals: u8, tick_units: u64, lot_size: u64) -> SymbolSpec {
        assert!(price_decimals <= 8, "at most 8 price decimals");
        assert!(
            tick_units > 0 && lot_size > 0,
            "tick and lot must be positive"
        );
        SymbolSpec {
            symbol: Symbol(symbol.to_owned()),
            price_decimals,
            tick_units,
            lot_size,
        }
    }

    /// Parses a decimal price string into ticks, naming `field` in any error.
    ///
    /// Accepts `"101"`, `"101.2"`, `"101.25"` and trailing zeros beyond the precision
    /// (`"101.2500"`); refuses signs, exponents, empty parts, zero, negative prices, more
    /// significant decimals than the symbol allows, and prices off the tick grid.
    pub fn parse_price(&self, field: &str, s: &str) -> Result<Price, ValidationError> {
        let malformed = || {
            ValidationError::new(
                field,
                ErrorCode::Malformed,
                format!("price {s:?} is not a decimal number such as \"101.25\""),
            )
        };
        if s.starts_with('-') {
            return Err(ValidationError::new(
                field,
                ErrorCode::OutOfRange,
                format!("price {s:?} must be positive"),
            ));
        }
        let (int_part, frac_part) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        if int_part.is_empty()
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
            || (s.contains('.') && frac_part.is_empty())
        {
            return Err(malformed());
        }
        let decimals = usize::from(self.price_decimals);
        let significant = frac_part.trim_end_matches('0');
        if significant.len() > decimals {
            return Err(ValidationError::new(
                field,
                ErrorCode::OffTickGrid,
                format!(
                    "price {s:?} has more than {decimals} decimals; {} trades in ticks of {}",
                    self.symbol,
                    self.tick_string()
                ),
            ));
        }
        let too_large = || {
            ValidationError::new(
                field,
                ErrorCode::OutOfRange,
                format!("price {s:?} is too large"),
            )
        };
        let int_digits = int_part.trim_start_matches('0');
        if int_digits.len() > 13 {
            return Err(too_large());
        }
        let mut units: i64 = 0;
        for b in int_digits.bytes() {
            units = units * 10 + i64::from(b - b'0');
        }
        for i in 0..decimals {
            let digit = significant
                .as_bytes()
                .get(i)
                .map_or(0, |b| i64::from(b - b'0'));
            units = units * 10 + digit;
        }
        if units > MAX_PRICE_UNITS {
            return Err(too_large());
        }
        if units == 0 {
            return Err(ValidationError::new(
                field,
                ErrorCode::OutOfRange,
                format!("price {s:?} must be greater than zero"),
            ));
        }
        let tick = self.tick_units as i64;
        if units % tick != 0 {
            return Err(ValidationError::new(
                field,
                ErrorCode::OffTickGrid,
                format!(
                    "price {s:?} is not a multiple of {}'s tick size {}",
                    self.symbol,
                    self.tick_string()
                ),
            ));
        }
        Ok(Price(units / tick))
    }

    /// Formats ticks as the decimal string a client sent (`2025` ticks of 0.05 → `"101.25"`).
    pub fn format_price(&self, price: Price) -> String {
        self.format_units(price.0 * self.tick_units as i64)
    }

    /// The tick size as a decimal string (`"0.01"`).
    pub fn tick_string(&self) -> String {
        self.format_units(self.tick_units as i64)
    }

    fn format_units(&self, units: i64) -> String {
        let decimals = u32::from(self.price_decimals);
        if decimals == 0 {
            return units.to_string();
        }
        let scale = 10i64.pow(decimals);
        let sign = if units < 0 { "-" } else { "" };
        let abs = units.unsigned_abs();
        format!(
            "{sign}{}.{:0width$}",
            abs / scale as u64,
            abs % scale as u64,
            width = decimals as usize
        )
    }
}

/// The symbols the exchange lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    specs: Vec<SymbolSpec>,
}

impl Catalog {
    pub fn new(specs: Vec<SymbolSpec>) -> Catalog {
        Catalog { specs }
    }

    /// The lab's listing: six equities in cents, lots of 1, and one (`BRK.A`-like `IDX`) with a
    /// 0.05 tick and lots of 10 so that grid validation is exercised by real traffic.
    pub fn lab() -> Catalog {
        Catalog::new(vec![
            SymbolSpec::new("AAPL", 2, 1, 1),
            SymbolSpec::new("MSFT", 2, 1, 1),
            SymbolSpec::new("GOOG", 2, 1, 1),
            SymbolSpec::new("AMZN", 2, 1, 1),
            SymbolSpec::new("TSLA", 2, 1, 1),
            SymbolSpec::new("NVDA", 2, 1, 1),
            SymbolSpec::new("IDX", 2, 5, 10),
        ])
    }

    /// Looks a ticker up, naming `field` if it is not listed.
    pub fn get(&self, field: &str, symbol: &str) -> Result<&SymbolSpec, ValidationError> {
        self.specs
            .iter()
            .find(|s| s.symbol.as_str() == symbol)
            .ok_or_else(|| {
                ValidationError::new(
                    field,
                    ErrorCode::UnknownSymbol,
                    format!(
                        "symbol {symbol:?} is not listed; listed: {}",
                        self.specs
                            .iter()
                            .map(|s| s.symbol.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    pub fn specs(&self) -> &[SymbolSpec] {
        &self.specs
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::lab()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cents() -> SymbolSpec {
        SymbolSpec::new("AAPL", 2, 1, 1)
    }

    fn nickels() -> SymbolSpec {
        SymbolSpec::new("IDX", 2, 5, 10)
    }

    #[test]
    fn parses_and_formats_prices() {
        let table: &[(&str, i64, &str)] = &[
            ("101.25", 10125, "101.25"),
            ("101", 10100, "101.00"),
            ("101.2", 10120, "101.20"),
            ("101.2500", 10125, "101.25"),
            ("0.01", 1, "0.01"),
            ("007.50", 750, "7.50"),
        ];
        for (input, ticks, formatted) in table {
            let p = cents().parse_price("price", input).unwrap();
            assert_eq!(p, Price(*ticks), "{input}");
            assert_eq!(cents().format_price(p), *formatted, "{input}");
        }
        assert_eq!(
            nickels().parse_price("price", "101.25").unwrap(),
            Price(2025)
        );
        assert_eq!(nickels().format_price(Price(2025)), "101.25");
    }

    #[test]
    fn refuses_bad_prices_naming_the_field() {
        let table: &[(&str, ErrorCode)] = &[
            ("", ErrorCode::Malformed),
            ("abc", ErrorCode::Malformed),
            ("1e5", ErrorCode::Malformed),
            ("+1", ErrorCode::Malformed),
            ("1.", ErrorCode::Malformed),
            (".5", ErrorCode::Malformed),
            ("1.2.3", ErrorCode::Malformed),
            (" 1", ErrorCode::Malformed),
            ("-1.00", ErrorCode::OutOfRange),
            ("0", ErrorCode::OutOfRange),
            ("0.00", ErrorCode::OutOfRange),
            ("101.255", ErrorCode::OffTickGrid),
            ("99999999999999999999", ErrorCode::OutOfRange),
            ("NaN", ErrorCode::Malformed),
        ];
        for (input, code) in table {
            let e = cents().parse_price("price", input).unwrap_err();
            assert_eq!(e.code, *code, "{input:?}: {e}");
            assert_eq!(e.field, "price");
        }
        let e = nickels().parse_price("price", "101.27").unwrap_err();
        assert_eq!(e.code, ErrorCode::OffTickGrid);
        assert!(e.message.contains("0.05"), "{}", e.message);
    }

    #[test]
    fn catalog_names_unknown_symbols() {
        let e = Catalog::lab().get("symbol", "ZZZ").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownSymbol);
        assert!(e.message.contains("AAPL"));
    }
}
