//! Money as integer minor units of one ISO-4217 currency. Never a float: amounts are
//! parsed from their decimal text (a JSON number is read through its text as well).

use serde::{Deserialize, Serialize};
use std::fmt;

/// An ISO-4217 code, upper case, three ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("not an ISO-4217 currency code: {0:?}")]
    Currency(String),
    #[error("not a decimal amount: {0:?}")]
    Amount(String),
    #[error("amount {0:?} does not fit in 64-bit minor units")]
    Overflow(String),
}

impl Currency {
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        let bytes = code.trim().as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_alphabetic) {
            return Err(MoneyError::Currency(code.to_owned()));
        }
        let mut upper = [0u8; 3];
        for (slot, byte) in upper.iter_mut().zip(bytes) {
            *slot = byte.to_ascii_uppercase();
        }
        Ok(Currency(upper))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("currency codes are checked ASCII")
    }

    /// Digits after the decimal point in this currency's minor unit (ISO-4217).
    pub fn exponent(&self) -> u32 {
        match self.as_str() {
            "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF"
            | "UGX" | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            "CLF" | "UYW" => 4,
            _ => 2,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Currency::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An amount in minor units of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    /// Parses a decimal string such as `"4200.50"`, `"-3"`, `"1e3"` into minor units,
    /// rounding half away from zero past the currency's exponent.
    pub fn parse_decimal(text: &str, currency: Currency) -> Result<Self, MoneyError> {
        let minor = parse_minor(text.trim(), currency.exponent())
            .ok_or_else(|| MoneyError::Amount(text.to_owned()))??;
        Ok(Money { minor, currency })
    }

    /// Formats as a decimal with the currency's exponent: `4200.50 EUR`.
    pub fn to_decimal_string(&self) -> String {
        format_minor(self.minor, self.currency.exponent())
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal_string(), self.currency)
    }
}

/// Formats minor units as a decimal string with `exponent` fraction digits.
pub fn format_minor(minor: i64, exponent: u32) -> String {
    if exponent == 0 {
        return minor.to_string();
    }
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let scale = 10u64.pow(exponent);
    format!(
        "{sign}{}.{:0width$}",
        abs / scale,
        abs % scale,
        width = exponent as usize
    )
}

/// A decimal exponent; one beyond `i32` is clamped to its end, where every amount
/// already rounds to zero or overflows (as serde_json reads such a JSON number).
fn parse_exponent(text: &str) -> Option<i32> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<i32>()
            .unwrap_or(if negative { i32::MIN } else { i32::MAX }),
    )
}

/// `None`: not a number; `Some(Err)`: a number that overflows.
fn parse_minor(text: &str, exponent: u32) -> Option<Result<i64, MoneyError>> {
    let (mantissa, exp10) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, parse_exponent(exponent)?),
        None => (text, 0),
    };
    if mantissa.is_empty() {
        return None;
    }
    let (negative, digits) = if let Some(digits) = mantissa.strip_prefix('-') {
        (true, digits)
    } else if let Some(digits) = mantissa.strip_prefix('+') {
        (false, digits)
    } else {
        (false, mantissa)
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // All digits as one integer, and where the decimal point sits relative to minor units.
    let all_digits: String = format!("{int_part}{frac_part}");
    // In i64: an exponent near the ends of i32 must not overflow the sum.
    let shift = i64::from(exponent) + i64::from(exp10) - frac_part.len() as i64;
    let overflow = || MoneyError::Overflow(text.to_owned());
    let mut value: i128 = 0;
    for byte in all_digits.bytes() {
        value = value * 10 + i128::from(byte - b'0');
        if value > i128::from(i64::MAX) * 1_000_000_000_000 {
            return Some(Err(overflow()));
        }
    }
    if value == 0 {
        // Zero at any scale: `0e70` is no overflow (fuzzing found it refused as one).
        return Some(Ok(0));
    }
    let value = if shift >= 0 {
        let scale = u32::try_from(shift)
            .ok()
            .and_then(|shift| 10i128.checked_pow(shift));
        match scale.and_then(|scale| value.checked_mul(scale)) {
            Some(v) => v,
            None => return Some(Err(overflow())),
        }
    } else {
        let divisor = match u32::try_from(-shift)
            .ok()
            .and_then(|shift| 10i128.checked_pow(shift))
        {
            Some(d) => d,
            None => return Some(Ok(0)),
        };
        let quotient = value / divisor;
        let remainder = value % divisor;
        if remainder * 2 >= divisor {
            quotient + 1
        } else {
            quotient
        }
    };
    let value = if negative { -value } else { value };
    Some(i64::try_from(value).map_err(|_| overflow()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::parse("eur").unwrap()
    }

    #[test]
    fn decimal_strings_become_exact_minor_units() {
        assert_eq!(
            Money::parse_decimal("4200.50", eur()).unwrap().minor,
            420050
        );
        assert_eq!(Money::parse_decimal("4200.5", eur()).unwrap().minor, 420050);
        assert_eq!(Money::parse_decimal("0.1", eur()).unwrap().minor, 10);
        assert_eq!(Money::parse_decimal("-3", eur()).unwrap().minor, -300);
        assert_eq!(Money::parse_decimal("1e3", eur()).unwrap().minor, 100000);
        assert_eq!(Money::parse_decimal("1.005", eur()).unwrap().minor, 101);
        assert_eq!(Money::parse_decimal(".5", eur()).unwrap().minor, 50);
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money::parse_decimal("1500", jpy).unwrap().minor, 1500);
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(Money::parse_decimal("1.5", kwd).unwrap().minor, 1500);
    }

    #[test]
    fn garbage_and_overflow_are_errors_not_zero() {
        for bad in [
            "", "abc", "1,5", "--1", "1.2.3", ".", "é", "1é", "€5", "5e€", "e5", "-", "+",
        ] {
            assert!(Money::parse_decimal(bad, eur()).is_err(), "{bad:?}");
        }
        assert!(matches!(
            Money::parse_decimal("99999999999999999999999", eur()),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn an_exponent_at_the_ends_of_i32_is_zero_or_an_overflow_not_a_panic() {
        // Found by `proptests::no_exponent_panics_the_amount_parser`: the exponent was
        // added to the currency's and the fraction's digits in i32.
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(
            Money::parse_decimal(".000e-2147483648", jpy).unwrap().minor,
            0
        );
        assert_eq!(
            Money::parse_decimal("1.5e-2147483648", eur())
                .unwrap()
                .minor,
            0
        );
        assert!(matches!(
            Money::parse_decimal("1e2147483647", eur()),
            Err(MoneyError::Overflow(_))
        ));
        assert!(matches!(
            Money::parse_decimal("1.25e2147483647", jpy),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn zero_with_any_exponent_is_zero_not_an_overflow() {
        // Found by the `money` fuzz target (fuzz/regressions/money/zero-e70): `0e70`
        // was refused as an overflow, while the same JSON number, read as a float by
        // serde_json and written back as `0.0`, was zero.
        let bhd = Currency::parse("BHD").unwrap();
        for zero in ["0e70", "0E400", "-0.000e2147483647", "00.0e39"] {
            assert_eq!(
                Money::parse_decimal(zero, bhd),
                Ok(Money::new(0, bhd)),
                "{zero}"
            );
        }
        assert!(matches!(
            Money::parse_decimal("1e70", bhd),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn an_exponent_beyond_i32_rounds_to_zero_or_overflows_like_a_json_number() {
        // Found by the `money` fuzz target (fuzz/regressions/money/zero-e-4372080699):
        // such an amount was "not a decimal amount", while serde_json reads the same
        // JSON number as zero.
        let clf = Currency::parse("CLF").unwrap();
        for tiny in ["0e-4372080699", "1.5e-99999999999", "-7E-4372080699"] {
            assert_eq!(
                Money::parse_decimal(tiny, clf),
                Ok(Money::new(0, clf)),
                "{tiny}"
            );
        }
        assert_eq!(
            Money::parse_decimal("0e+99999999999", clf),
            Ok(Money::new(0, clf))
        );
        assert!(matches!(
            Money::parse_decimal("1e99999999999", clf),
            Err(MoneyError::Overflow(_))
        ));
        for bad in ["1e", "1e-", "1e+-5", "1e5.0", "1e 5"] {
            assert!(
                matches!(Money::parse_decimal(bad, clf), Err(MoneyError::Amount(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn minor_units_format_back_to_decimals() {
        assert_eq!(Money::new(420050, eur()).to_string(), "4200.50 EUR");
        assert_eq!(Money::new(-5, eur()).to_decimal_string(), "-0.05");
        assert_eq!(format_minor(1500, 0), "1500");
    }

    #[test]
    fn formatting_then_parsing_gives_back_the_same_minor_units() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for code in ["JPY", "EUR", "KWD", "CLF"] {
            let currency = Currency::parse(code).unwrap();
            for _ in 0..2_000 {
                let minor: i64 = match rng.random_range(0..3) {
                    0 => rng.random_range(-1_000..1_000),
                    1 => rng.random_range(-10_i64.pow(12)..10_i64.pow(12)),
                    _ => rng.random(),
                };
                let text = format_minor(minor, currency.exponent());
                let parsed = Money::parse_decimal(&text, currency).unwrap();
                assert_eq!(parsed.minor, minor, "{text} {code}");
            }
        }
    }

    #[test]
    fn currency_codes_are_checked_and_upper_cased() {
        assert_eq!(Currency::parse("usd").unwrap().as_str(), "USD");
        assert!(Currency::parse("US").is_err());
        assert!(Currency::parse("U$D").is_err());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Text shaped like a decimal amount, exponents of any size included.
    fn decimal_like() -> impl Strategy<Value = String> {
        "[ +-]?[0-9]{0,25}(\\.[0-9]{0,25})?([eE][+-]?[0-9]{1,12})? ?"
    }

    /// A decimal mantissa with an exponent anywhere in `i32`, its ends included.
    fn scientific() -> impl Strategy<Value = String> {
        let exponent = prop_oneof![
            any::<i32>(),
            (i32::MAX - 40)..=i32::MAX,
            i32::MIN..=(i32::MIN + 40),
        ];
        ("[+-]?[0-9]{0,6}(\\.[0-9]{0,6})?", exponent)
            .prop_map(|(mantissa, exponent)| format!("{mantissa}e{exponent}"))
    }

    fn currency() -> impl Strategy<Value = Currency> {
        prop::sample::select(vec!["JPY", "EUR", "KWD", "CLF"])
            .prop_map(|code| Currency::parse(code).expect("a listed ISO-4217 code"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn no_text_panics_the_amount_parser(text in any::<String>(), currency in currency()) {
            let _ = Money::parse_decimal(&text, currency);
            let _ = Currency::parse(&text);
        }

        #[test]
        fn no_decimal_like_text_panics_the_amount_parser(
            text in decimal_like(),
            currency in currency(),
        ) {
            let _ = Money::parse_decimal(&text, currency);
        }

        #[test]
        fn no_exponent_panics_the_amount_parser(text in scientific(), currency in currency()) {
            let _ = Money::parse_decimal(&text, currency);
        }

        #[test]
        fn every_formatted_amount_parses_back_to_its_minor_units(
            minor in any::<i64>(),
            currency in currency(),
        ) {
            let text = Money::new(minor, currency).to_decimal_string();
            prop_assert_eq!(Money::parse_decimal(&text, currency), Ok(Money::new(minor, currency)));
        }
    }
}
