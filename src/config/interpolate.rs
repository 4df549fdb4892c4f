//! `${VAR}` and `${credential:NAME}` substitution over the parsed TOML values.
//!
//! Runs before typing, over every string value, and collects every failure so a user
//! fixes them all in one pass. `${VAR}` reads the environment; `${credential:NAME}`
//! reads the file `$CREDENTIALS_DIRECTORY/NAME` (systemd `LoadCredential=`), without its
//! trailing newline. `$${` writes a literal `${`. The substituted values are returned so
//! that any later error message can be scrubbed of them.

use std::path::Path;

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
    let mut substituted = Vec::new();
    let mut errors = Vec::new();
    walk(
        value,
        &mut String::new(),
        env,
        &mut substituted,
        &mut errors,
    );
    if errors.is_empty() {
        Ok(substituted)
    } else {
        Err(errors)
    }
}

fn walk(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Env,
    substituted: &mut Vec<String>,
    errors: &mut Vec<InterpolationError>,
) {
    match value {
        toml::Value::String(text) if text.contains('$') => {
            match substitute(text, env, substituted) {
                Ok(new) => *text = new,
                Err(problems) => {
                    errors.extend(problems.into_iter().map(|message| InterpolationError {
                        key: path.clone(),
                        message,
                    }))
                }
            }
        }
        toml::Value::Array(items) => {
            for (at, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{at}]"));
                walk(item, path, env, substituted, errors);
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
                walk(item, path, env, substituted, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn substitute(
    text: &str,
    env: &dyn Env,
    substituted: &mut Vec<String>,
) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
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
            problems.push("unterminated \"${\": write \"$${\" for a literal".to_owned());
            break;
        };
        rest = remainder;
        match resolve(name, env) {
            Ok(value) => {
                if !value.is_empty() {
                    substituted.push(value.clone());
                }
                out.push_str(&value);
            }
            Err(problem) => problems.push(problem),
        }
    }
    out.push_str(rest);
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

fn resolve(name: &str, env: &dyn Env) -> Result<String, String> {
    if let Some(credential) = name.strip_prefix("credential:") {
        if credential.is_empty() || credential.contains('/') || credential.contains("..") {
            return Err(format!(
                "credential name {credential:?} must be a plain file name"
            ));
        }
        let Some(dir) = env.var("CREDENTIALS_DIRECTORY") else {
            return Err(format!(
                "${{credential:{credential}}} needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)"
            ));
        };
        let path = Path::new(&dir).join(credential);
        return std::fs::read_to_string(&path)
            .map(|value| value.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|error| {
                format!("reading credential {credential:?} from $CREDENTIALS_DIRECTORY: {error}")
            });
    }
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not an environment variable name"));
    }
    env.var(name)
        .ok_or_else(|| format!("environment variable {name} is not set"))
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
}
