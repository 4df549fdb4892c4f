//! A secret from the config: Debug and Display print `***`; `expose()` is called at the
//! point of use and nowhere else.

use serde::{Deserialize, Deserializer};
use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret's value; call it where the value is sent, never to log or format.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// False for a `${credential:NAME}` that could not be read in this environment and
    /// was deferred (see `config::interpolate::Options`): its value is a placeholder.
    pub fn is_available(&self) -> bool {
        self.0 != super::interpolate::UNAVAILABLE
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// One secret or a list of them (several active webhook secrets during a rotation).
#[derive(Clone, Debug, Default)]
pub struct Secrets(pub Vec<Secret>);

impl<'de> Deserialize<'de> for Secrets {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(Secret),
            Many(Vec<Secret>),
        }
        // Untagged errors would quote nothing secret, but say what is expected.
        match OneOrMany::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected a secret string or a list of secret strings")
        })? {
            OneOrMany::One(secret) => Ok(Secrets(vec![secret])),
            OneOrMany::Many(secrets) => Ok(Secrets(secrets)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            token: Secret,
        }
        let shown = format!(
            "{:?}",
            Holder {
                token: secret.clone()
            }
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(secret.expose(), "hunter2");
    }
}
