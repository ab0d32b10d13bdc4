//! `${VAR}` references in the configuration's strings, replaced by the environment's values
//! before the file is read into typed values, so secrets need not be written into it.

/// Replaces `${VAR}` in every string; returns the name of the first variable that is unset.
pub(super) fn expand_env(
    value: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    match value {
        toml::Value::String(s) => {
            if s.contains("${") {
                *s = expand_str(s, env)?;
            }
            Ok(())
        }
        toml::Value::Array(items) => items.iter_mut().try_for_each(|v| expand_env(v, env)),
        toml::Value::Table(t) => t.iter_mut().try_for_each(|(_, v)| expand_env(v, env)),
        _ => Ok(()),
    }
}

fn expand_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            // An unterminated reference is kept literally rather than guessed at.
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        out.push_str(&env(var).ok_or_else(|| var.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
