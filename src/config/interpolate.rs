//! `${VAR}` and `${credential:NAME}` substitution over the parsed TOML values.
//!
//! Runs before typing, over every string value, and collects every failure so a user
//! fixes them all in one pass. `${VAR}` reads the environment; `${credential:NAME}`
//! reads the file `NAME` in the credentials directory (`--credentials-dir`, else
//! `$CREDENTIALS_DIRECTORY`, which systemd sets for a service with `LoadCredential=`),
//! without its trailing newline. `$${` writes a literal `${`. The substituted values are
//! returned so that any later error message can be scrubbed of them.
//!
//! With [`Options::defer_credentials`] a credential that cannot be read here (no
//! directory, no such file, not readable) is no error: the value becomes
//! [`UNAVAILABLE`] and its key is listed, so a command that does not use it still
//! runs as a user who cannot read the service's credentials; a command that does use
//! it refuses with the list (see `Config::require_credentials`).

//!
//! Two guards keep them out of what a person reads:
//! - the config module builds every [`super::ConfigError`] through a scrubbing
//!   constructor, with the values of the config it is about;
//! - `config::load` also registers them for the whole process ([`remember_for_process`]),
//!   and the log writer and the final error message of the binary pass through
//!   [`scrub_process_output`], so an error path outside the config module (a store path,
//!   a log line quoting a value) cannot print them either.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Values shorter than this are not scrubbed: `***` in place of every "1" or "on" would
/// garble messages, and a secret is never that short.
const MIN_SCRUBBED_LEN: usize = 3;

/// The values substituted into one config, as the texts to scrub from messages: each
/// value as written, and as `{:?}` and JSON escape it (`"`, `\`, control characters),
/// longest first. Debug prints only how many there are.
#[derive(Clone, Default)]
pub struct Substituted(Arc<[String]>);

impl Substituted {
    pub fn new(values: &[String]) -> Self {
        Substituted(patterns(values).into())
    }

    /// `text` with every substituted value replaced by `***`.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        scrub_with(&self.0, text)
    }
}

impl fmt::Debug for Substituted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Substituted({} texts, ***)", self.0.len())
    }
}

fn patterns(values: &[String]) -> Vec<String> {
    let mut patterns: Vec<String> = Vec::new();
    for value in values.iter().filter(|v| v.len() >= MIN_SCRUBBED_LEN) {
        let unquote = |quoted: String| {
            quoted
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .map(str::to_owned)
        };
        let escaped = [
            unquote(format!("{value:?}")),
            unquote(serde_json::Value::String(value.clone()).to_string()),
        ];
        for pattern in std::iter::once(value.clone()).chain(escaped.into_iter().flatten()) {
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
        }
    }
    // Longest first: a value that holds another one is replaced whole.
    patterns.sort_by_key(|pattern| std::cmp::Reverse(pattern.len()));
    patterns
}

fn scrub_with<'a>(patterns: &[String], text: &'a str) -> Cow<'a, str> {
    let mut scrubbed = Cow::Borrowed(text);
    for pattern in patterns {
        if scrubbed.contains(pattern.as_str()) {
            scrubbed = Cow::Owned(scrubbed.replace(pattern.as_str(), "***"));
        }
    }
    scrubbed
}

/// Every value substituted into a config this process loaded. Process-wide like the
/// log writer that reads it; it only grows (a reload adds the new config's values).
static PROCESS_PATTERNS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a loaded config's substituted values for [`scrub_process_output`].
pub fn remember_for_process(substituted: &Substituted) {
    if substituted.0.is_empty() {
        return;
    }
    // A poisoned lock still holds a usable list: a writer never leaves it half-written.
    let mut all = PROCESS_PATTERNS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for pattern in substituted.0.iter() {
        if !all.contains(pattern) {
            all.push(pattern.clone());
        }
    }
    all.sort_by_key(|pattern| std::cmp::Reverse(pattern.len()));
}

/// `text` (a log line, the binary's final error message) with every value substituted
/// into a config this process loaded replaced by `***`.
pub fn scrub_process_output(text: &str) -> Cow<'_, str> {
    let all = PROCESS_PATTERNS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    scrub_with(&all, text)
}

/// The value a deferred credential gets: never a usable secret, never a valid URL, and
/// recognised by `Secret::is_available`.
pub const UNAVAILABLE: &str = "\u{0}dealsync: credential not available\u{0}";

/// How credentials are found and what happens when one cannot be read.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where `${credential:NAME}` files are read; `None`: `$CREDENTIALS_DIRECTORY`.
    pub credentials_dir: Option<PathBuf>,
    /// Leave unreadable credentials as [`UNAVAILABLE`] instead of failing.
    pub defer_credentials: bool,
}

/// How to provide a credential, appended to every error about one.
pub const HOW_TO_PROVIDE: &str = "the service gets its credentials from systemd \
(LoadCredential= sets $CREDENTIALS_DIRECTORY); elsewhere pass --credentials-dir DIR, a \
directory with one file per credential, or run the command the way systemd/README.md shows";

/// A credential that could not be read, when deferred.
#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    /// The key path whose value names it.
    pub key: String,
    /// The credential's name (`${credential:NAME}`).
    pub credential: String,
    /// Why it could not be read here.
    pub reason: String,
}

/// What a successful interpolation did.
#[derive(Debug, Clone, Default)]
pub struct Interpolated {
    /// Every value substituted, to scrub from later error messages.
    pub substituted: Vec<String>,
    /// Credentials left unavailable (only with `defer_credentials`).
    pub unavailable: Vec<Unavailable>,
}

/// Looks up environment variables; a trait object so tests need not touch the process env.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A failed substitution: where, and why (never the value).
#[derive(Debug, Clone, PartialEq)]
pub struct InterpolationError {
    pub key: String,
    pub message: String,
}

/// Substitutes in place; returns the substituted values, or every error found.
pub fn interpolate(
    value: &mut toml::Value,
    env: &dyn Env,
) -> Result<Vec<String>, Vec<InterpolationError>> {
    interpolate_with(value, env, &Options::default()).map(|done| done.substituted)
}

/// Substitutes in place with `options`; returns what it did, or every error found.
pub fn interpolate_with(
    value: &mut toml::Value,
    env: &dyn Env,
    options: &Options,
) -> Result<Interpolated, Vec<InterpolationError>> {
    let mut walker = Walker {
        env,
        options,
        done: Interpolated::default(),
        errors: Vec::new(),
    };
    walker.walk(value, &mut String::new());
    if walker.errors.is_empty() {
        Ok(walker.done)
    } else {
        Err(walker.errors)
    }
}

struct Walker<'a> {
    env: &'a dyn Env,
    options: &'a Options,
    done: Interpolated,
    errors: Vec<InterpolationError>,
}

/// Why one `${…}` could not be resolved.
enum Failure {
    /// A credential that cannot be read in this environment (deferrable).
    Unreadable { credential: String, reason: String },
    /// Anything else: always an error.
    Invalid(String),
}

impl Walker<'_> {
    fn walk(&mut self, value: &mut toml::Value, path: &mut String) {
        match value {
            toml::Value::String(text) if text.contains('$') => {
                let mut failures = Vec::new();
                let new = self.substitute(text, &mut failures);
                let mut deferred = false;
                for failure in failures {
                    match failure {
                        Failure::Unreadable { credential, reason }
                            if self.options.defer_credentials =>
                        {
                            deferred = true;
                            self.done.unavailable.push(Unavailable {
                                key: path.clone(),
                                credential,
                                reason,
                            });
                        }
                        Failure::Unreadable { credential, reason } => {
                            self.errors.push(InterpolationError {
                                key: path.clone(),
                                message: format!(
                                    "${{credential:{credential}}} is not available: {reason}; {HOW_TO_PROVIDE}"
                                ),
                            })
                        }
                        Failure::Invalid(reason) => self.errors.push(InterpolationError {
                            key: path.clone(),
                            message: reason,
                        }),
                    }
                }
                *text = if deferred {
                    UNAVAILABLE.to_owned()
                } else {
                    new
                };
            }
            toml::Value::Array(items) => {
                for (at, item) in items.iter_mut().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{at}]"));
                    self.walk(item, path);
                    path.truncate(len);
                }
            }
            toml::Value::Table(table) => {
                for (key, item) in table.iter_mut() {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    self.walk(item, path);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }

    fn substitute(&mut self, text: &str, failures: &mut Vec<Failure>) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some((before, after)) = rest.split_once('$') {
            out.push_str(before);
            // `after` is the text after this `$`.
            if let Some(tail) = after.strip_prefix("${") {
                out.push_str("${");
                rest = tail;
                continue;
            }
            let Some(tail) = after.strip_prefix('{') else {
                out.push('$');
                rest = after;
                continue;
            };
            let Some((name, remainder)) = tail.split_once('}') else {
                failures.push(Failure::Invalid(
                    "unterminated \"${\": write \"$${\" for a literal".to_owned(),
                ));
                break;
            };
            rest = remainder;
            match self.resolve(name) {
                Ok(value) => {
                    if !value.is_empty() {
                        self.done.substituted.push(value.clone());
                    }
                    out.push_str(&value);
                }
                Err(failure) => failures.push(failure),
            }
        }
        out.push_str(rest);
        out
    }

    fn resolve(&self, name: &str) -> Result<String, Failure> {
        if let Some(credential) = name.strip_prefix("credential:") {
            if credential.is_empty() || credential.contains('/') || credential.contains("..") {
                return Err(Failure::Invalid(format!(
                    "credential name {credential:?} must be a plain file name"
                )));
            }
            let unreadable = |reason: String| Failure::Unreadable {
                credential: credential.to_owned(),
                reason,
            };
            let (dir, named) = match &self.options.credentials_dir {
                Some(dir) => (dir.clone(), format!("--credentials-dir {}", dir.display())),
                None => match self.env.var("CREDENTIALS_DIRECTORY") {
                    Some(dir) => (PathBuf::from(dir), "$CREDENTIALS_DIRECTORY".to_owned()),
                    None => {
                        return Err(unreadable(
                            "$CREDENTIALS_DIRECTORY is not set and no --credentials-dir was given"
                                .to_owned(),
                        ));
                    }
                },
            };
            let path = Path::new(&dir).join(credential);
            return std::fs::read_to_string(&path)
                .map(|value| value.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|error| {
                    unreadable(format!(
                        "reading credential {credential:?} from {named}: {}: {error}",
                        path.display()
                    ))
                });
        }
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Failure::Invalid(format!(
                "{name:?} is not an environment variable name"
            )));
        }
        self.env
            .var(name)
            .ok_or_else(|| Failure::Invalid(format!("environment variable {name} is not set")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    pub struct MapEnv(pub HashMap<String, String>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn variables_are_substituted_and_every_missing_one_is_reported() {
        let mut value: toml::Value = toml::from_str(
            "a = \"x-${ONE}-y\"\nb = \"${MISSING}\"\n[t]\nc = [\"${ALSO_MISSING}\", \"$${literal}\"]",
        )
        .unwrap();
        let errors = interpolate(&mut value, &env(&[("ONE", "1")])).unwrap_err();
        let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["b", "t.c[0]"]);
        assert!(errors[0].message.contains("MISSING is not set"));

        let mut value: toml::Value =
            toml::from_str("a = \"x-${ONE}-y\"\nb = \"$${literal} costs $5\"").unwrap();
        let substituted = interpolate(&mut value, &env(&[("ONE", "1")])).unwrap();
        assert_eq!(value["a"].as_str(), Some("x-1-y"));
        assert_eq!(value["b"].as_str(), Some("${literal} costs $5"));
        assert_eq!(substituted, ["1"]);

        // Multi-byte text around and inside the markers.
        let mut value: toml::Value =
            toml::from_str("a = \"é$€${ONE}ü$${é}\"\nb = \"${É}\"").unwrap();
        let errors = interpolate(&mut value, &env(&[("ONE", "1")])).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "b");
        let mut value: toml::Value = toml::from_str("a = \"é$€${ONE}ü$${é}\"").unwrap();
        interpolate(&mut value, &env(&[("ONE", "1")])).unwrap();
        assert_eq!(value["a"].as_str(), Some("é$€1ü${é}"));
    }

    #[test]
    fn credentials_are_read_from_the_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hubspot_token"), "pat-123\n").unwrap();
        let dir_text = dir.path().to_str().unwrap();
        let mut value: toml::Value =
            toml::from_str("token = \"${credential:hubspot_token}\"").unwrap();
        interpolate(&mut value, &env(&[("CREDENTIALS_DIRECTORY", dir_text)])).unwrap();
        assert_eq!(value["token"].as_str(), Some("pat-123"));

        let mut value: toml::Value = toml::from_str("token = \"${credential:absent}\"").unwrap();
        let errors =
            interpolate(&mut value, &env(&[("CREDENTIALS_DIRECTORY", dir_text)])).unwrap_err();
        assert!(errors[0].message.contains("reading credential \"absent\""));
    }

    #[test]
    fn the_credentials_dir_option_wins_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-option\n").unwrap();
        let mut value: toml::Value = toml::from_str("token = \"${credential:token}\"").unwrap();
        let options = Options {
            credentials_dir: Some(dir.path().to_owned()),
            defer_credentials: false,
        };
        interpolate_with(
            &mut value,
            &env(&[("CREDENTIALS_DIRECTORY", "/nonexistent")]),
            &options,
        )
        .unwrap();
        assert_eq!(value["token"].as_str(), Some("from-option"));
    }

    #[test]
    fn deferred_credentials_are_listed_and_other_failures_stay_errors() {
        let text = "token = \"${credential:crm}\"\nsecrets = [\"${credential:hook}\", \"plain\"]\nurl = \"smtp://${credential:smtp}@host\"\n";
        let options = Options {
            credentials_dir: None,
            defer_credentials: true,
        };
        let mut value: toml::Value = toml::from_str(text).unwrap();
        let done = interpolate_with(&mut value, &env(&[]), &options).unwrap();
        let keys: Vec<_> = done
            .unavailable
            .iter()
            .map(|u| (u.key.as_str(), u.credential.as_str()))
            .collect();
        assert_eq!(
            keys,
            [("secrets[0]", "hook"), ("token", "crm"), ("url", "smtp")]
        );
        assert!(done.unavailable[0].reason.contains("CREDENTIALS_DIRECTORY"));
        assert_eq!(value["token"].as_str(), Some(UNAVAILABLE));
        assert_eq!(value["url"].as_str(), Some(UNAVAILABLE));
        assert_eq!(value["secrets"][1].as_str(), Some("plain"));

        // A missing environment variable is not a credential: still an error.
        let mut value: toml::Value = toml::from_str("a = \"${NOPE}\"").unwrap();
        let errors = interpolate_with(&mut value, &env(&[]), &options).unwrap_err();
        assert!(errors[0].message.contains("NOPE is not set"));
    }

    #[test]
    fn substituted_values_are_scrubbed_as_written_and_as_debug_and_json_escape_them() {
        let substituted = Substituted::new(&[
            "tok\"en\\s3cr3t".to_owned(),
            "s3cr3t".to_owned(),
            "on".to_owned(),
        ]);
        let value = "tok\"en\\s3cr3t";
        let debug = format!("unknown connector {value:?}");
        let json = serde_json::json!({ "message": value }).to_string();
        for text in [value.to_owned(), debug, json] {
            let scrubbed = substituted.scrub(&text);
            assert!(!scrubbed.contains("s3cr3t"), "{scrubbed}");
            assert!(scrubbed.contains("***"), "{scrubbed}");
        }
        assert_eq!(
            substituted.scrub("turned on"),
            "turned on",
            "values under three characters are left alone"
        );
        assert!(!format!("{substituted:?}").contains("s3cr3t"));
    }
}

#[cfg(test)]
mod proptests {
    use super::tests::MapEnv;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    }

    /// Text with more than its share of `$`, `{` and `}`.
    fn dollar_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof!["[${}]", "[A-Z_]{1,3}", "credential:", ".{0,3}"],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn no_text_panics_the_interpolation(
            text in prop_oneof![any::<String>(), dollar_text()],
        ) {
            let mut value = toml::Value::String(text);
            let _ = interpolate(&mut value, &env(&[("A", "x"), ("B_", "")]));
        }

        #[test]
        fn text_without_a_placeholder_is_left_as_it_is(
            text in prop_oneof![any::<String>(), dollar_text()],
        ) {
            prop_assume!(!text.contains("${"));
            let mut value = toml::Value::String(text.clone());
            prop_assert_eq!(interpolate(&mut value, &env(&[("A", "x")])), Ok(Vec::new()));
            prop_assert_eq!(value.as_str(), Some(text.as_str()));
        }

        #[test]
        fn a_variable_is_replaced_by_its_value_and_reported_as_substituted(
            before in "[^$]{0,8}",
            name in "[A-Za-z_][A-Za-z0-9_]{0,12}",
            secret in any::<String>(),
            after in "[^$]{0,8}",
        ) {
            let mut value = toml::Value::String(format!("{before}${{{name}}}{after}"));
            let substituted = interpolate(&mut value, &env(&[(&name, &secret)])).unwrap();
            let expected = format!("{before}{secret}{after}");
            prop_assert_eq!(value.as_str(), Some(expected.as_str()));
            let reported: Vec<String> = Some(secret).filter(|s| !s.is_empty()).into_iter().collect();
            prop_assert_eq!(substituted, reported);
        }
    }
}
