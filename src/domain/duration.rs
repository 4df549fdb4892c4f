//! Durations in the config carry their unit in the value: `90s`, `5m`, `7d`, `1h30m`.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Parses `90s`, `5m`, `7d`, `1h 30m`, `250ms`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "expected a duration with a unit like \"90s\", \"5m\" or \"7d\", got {text:?}"
        ));
    }
    humantime::parse_duration(trimmed)
        .map_err(|_| format!("expected a duration like \"90s\", \"5m\" or \"7d\", got {text:?}"))
}

/// Formats a duration the way the config writes it: `5m`, `7d`, `1h 30m`, `250ms`.
pub fn format(duration: Duration) -> String {
    let mut secs = duration.as_secs();
    let mut parts = Vec::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            parts.push(format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    let millis = duration.subsec_millis();
    if millis > 0 || parts.is_empty() {
        parts.push(format!("{millis}ms"));
    }
    parts.join(" ")
}

/// A duration as read from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected a duration string like \"90s\", \"5m\" or \"7d\"")
        })?;
        parse(&text)
            .map(ConfigDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Serde helpers for `Option<Duration>` as a duration string.
pub mod option_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => s.serialize_str(&super::format(*duration)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse("90").unwrap_err().contains("with a unit"));
        assert!(
            parse("5 minutez")
                .unwrap_err()
                .contains("got \"5 minutez\"")
        );
    }
}
