//! Request bodies: parsed by hand from JSON so that every bad field is
//! reported at once, each with its path, in the contract's 400 body.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};
use tollgate_proxy::policy::{FieldError, NetworkPolicy};

use crate::config::DEFAULT_TEMPLATE;

/// Collects field errors while reading one JSON object.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: String,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    /// Starts reading `value`, which must be an object whose fields are all in
    /// `known`. `prefix` is prepended to field paths (empty at the top level).
    pub fn new(value: &'a Value, prefix: &str, known: &[&str]) -> Result<Self, Vec<FieldError>> {
        let Some(obj) = value.as_object() else {
            let field = if prefix.is_empty() { "body" } else { prefix };
            return Err(vec![err(field, "must be a JSON object")]);
        };
        let mut f = Self {
            obj,
            prefix: prefix.to_string(),
            errors: Vec::new(),
        };
        for k in obj.keys() {
            if !known.contains(&k.as_str()) {
                let path = f.path(k);
                f.errors.push(err(&path, "is not a known field"));
            }
        }
        Ok(f)
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// Records an error on `key`.
    pub fn fail(&mut self, key: &str, msg: impl Into<String>) {
        let path = self.path(key);
        self.errors.push(FieldError {
            field: path,
            error: msg.into(),
        });
    }

    /// The raw value, treating JSON `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A string of 1..=`max` characters after trimming.
    pub fn string(&mut self, key: &str, required: bool, max: usize) -> Option<String> {
        match self.get(key) {
            None => {
                if required {
                    self.fail(key, "is required");
                }
                None
            }
            Some(Value::String(s)) => {
                let s = s.trim();
                if s.is_empty() {
                    self.fail(key, "must not be empty");
                    None
                } else if s.chars().count() > max {
                    self.fail(key, format!("must be at most {max} characters"));
                    None
                } else if s.chars().any(char::is_control) {
                    self.fail(key, "must not contain control characters");
                    None
                } else {
                    Some(s.to_string())
                }
            }
            Some(_) => {
                self.fail(key, "must be a string");
                None
            }
        }
    }

    /// An integer within `lo..=hi`.
    pub fn int(&mut self, key: &str, lo: i64, hi: i64) -> Option<i64> {
        match self.get(key) {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n) if (lo..=hi).contains(&n) => Some(n),
                Some(_) => {
                    self.fail(key, format!("must be between {lo} and {hi}"));
                    None
                }
                None => {
                    self.fail(key, format!("must be an integer between {lo} and {hi}"));
                    None
                }
            },
        }
    }

    /// A boolean.
    pub fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.get(key) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.fail(key, "must be true or false");
                None
            }
        }
    }

    /// A map of environment variables: POSIX-ish names, values without NUL.
    pub fn env_map(&mut self, key: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self.get(key) {
            None => {}
            Some(Value::Object(m)) => {
                if m.len() > 100 {
                    self.fail(key, "must have at most 100 entries");
                }
                for (k, v) in m {
                    let path = format!("{key}.{k}");
                    let name_ok = !k.is_empty()
                        && k.len() <= 256
                        && !k.starts_with(|c: char| c.is_ascii_digit())
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !name_ok {
                        self.fail(&path, "is not a valid environment variable name (letters, digits and _, not starting with a digit)");
                        continue;
                    }
                    match v {
                        Value::String(s) if s.contains('\0') => {
                            self.fail(&path, "must not contain a NUL character")
                        }
                        Value::String(s) if s.len() > 32 * 1024 => {
                            self.fail(&path, "must be at most 32768 bytes")
                        }
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        _ => self.fail(&path, "must be a string"),
                    }
                }
            }
            Some(_) => self.fail(key, "must be an object of string values"),
        }
        out
    }

    /// An optional `network_policy`, validated by the policy model.
    pub fn policy(&mut self, key: &str) -> Option<NetworkPolicy> {
        let v = self.get(key)?;
        let path = self.path(key);
        match NetworkPolicy::from_json(v, &path) {
            Ok(p) => Some(p),
            Err(errs) => {
                self.errors.extend(errs);
                None
            }
        }
    }

    /// Ends reading: the errors, if any.
    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

fn err(field: &str, msg: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        error: msg.to_string(),
    }
}

/// `POST /v1/snapshot/resume` and `POST /v1/snapshot/restore`, normalised.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Name (or id) of the snapshot.
    pub snapshot_name: String,
    /// Lifetime in seconds.
    pub timeout_secs: u64,
    /// Pause at expiry instead of deleting.
    pub auto_pause: bool,
    /// Overrides the snapshot's stored policy.
    pub network_policy: Option<NetworkPolicy>,
}

impl RestoreRequest {
    /// The seed contract: `timeout_min` in minutes (1..480, default 5).
    pub fn parse_resume(v: &Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(
            v,
            "",
            &[
                "snapshot_name",
                "timeout_min",
                "auto_pause",
                "network_policy",
            ],
        )?;
        let snapshot_name = f.string("snapshot_name", true, 64);
        let timeout_min = f.int("timeout_min", 1, 480).unwrap_or(5);
        let auto_pause = f.boolean("auto_pause").unwrap_or(false);
        let network_policy = f.policy("network_policy");
        f.finish()?;
        Ok(Self {
            snapshot_name: snapshot_name.unwrap_or_default(),
            timeout_secs: timeout_min as u64 * 60,
            auto_pause,
            network_policy,
        })
    }

    /// The SDK's spelling: `timeout` in seconds (1..28800, default 300).
    pub fn parse_restore(v: &Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(
            v,
            "",
            &["snapshot_name", "timeout", "auto_pause", "network_policy"],
        )?;
        let snapshot_name = f.string("snapshot_name", true, 64);
        let timeout = f.int("timeout", 1, 28800).unwrap_or(300);
        let auto_pause = f.boolean("auto_pause").unwrap_or(false);
        let network_policy = f.policy("network_policy");
        f.finish()?;
        Ok(Self {
            snapshot_name: snapshot_name.unwrap_or_default(),
            timeout_secs: timeout as u64,
            auto_pause,
            network_policy,
        })
    }
}

/// `POST /v1/sandbox`, normalised.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Template to run.
    pub template_name: String,
    /// vCPUs (1..8).
    pub vcpu: u32,
    /// Memory MiB (even, 512..8192).
    pub memory_mib: u32,
    /// Lifetime in seconds.
    pub timeout_secs: u64,
    /// Pause at expiry.
    pub auto_pause: bool,
    /// Environment inside the sandbox.
    pub env_vars: BTreeMap<String, String>,
    /// Policy (default allow-all).
    pub network_policy: Option<NetworkPolicy>,
}

impl CreateRequest {
    /// Parses and validates.
    pub fn parse(v: &Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(
            v,
            "",
            &[
                "template_name",
                "vcpu",
                "memory",
                "timeout",
                "auto_pause",
                "env_vars",
                "network_policy",
                "mounts",
                "otel_export",
            ],
        )?;
        let template_name = f.string("template_name", false, 64);
        let vcpu = f.int("vcpu", 1, 8).unwrap_or(1);
        let memory = f.int("memory", 512, 8192);
        if let Some(m) = memory {
            if m % 2 != 0 {
                f.fail("memory", "must be an even number of MiB");
            }
        }
        let timeout = f.int("timeout", 1, 28800).unwrap_or(300);
        let auto_pause = f.boolean("auto_pause").unwrap_or(false);
        let env_vars = f.env_map("env_vars");
        let network_policy = f.policy("network_policy");
        match f.get("mounts") {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => f.fail(
                "mounts",
                "object storage mounts are not supported by this host",
            ),
        }
        if f.boolean("otel_export") == Some(true) {
            f.fail(
                "otel_export",
                "OpenTelemetry export is not supported by this host",
            );
        }
        f.finish()?;
        Ok(Self {
            template_name: template_name.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
            vcpu: vcpu as u32,
            memory_mib: memory.unwrap_or(1024) as u32,
            timeout_secs: timeout as u64,
            auto_pause,
            env_vars,
            network_policy,
        })
    }
}

/// `POST /v1/sandbox/{id}/snapshot/create`.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// Snapshot name; generated when absent.
    pub name: Option<String>,
    /// Delete the sandbox once the snapshot is stored.
    pub kill_sandbox_after: bool,
}

impl SnapshotRequest {
    /// Parses and validates (an empty body is allowed).
    pub fn parse(v: &Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(v, "", &["name", "kill_sandbox_after"])?;
        let name = f.string("name", false, 64);
        if let Some(n) = &name {
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
            {
                f.fail("name", "may contain only letters, digits and - _ . : /");
            }
        }
        let kill_sandbox_after = f.boolean("kill_sandbox_after").unwrap_or(false);
        f.finish()?;
        Ok(Self {
            name,
            kill_sandbox_after,
        })
    }
}

/// `POST /v1/sandbox/{id}/process/execute`.
#[derive(Debug, Clone)]
pub struct ExecRequestBody {
    /// argv: `["/bin/sh", "-c", command]` or the given `argv`.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Extra environment.
    pub envs: BTreeMap<String, String>,
    /// Seconds before the command is killed.
    pub timeout_secs: u64,
}

impl ExecRequestBody {
    /// Parses and validates: exactly one of `command` (shell) and `argv`.
    pub fn parse(v: &Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(v, "", &["command", "argv", "cwd", "envs", "timeout"])?;
        let command = match f.get("command") {
            None => None,
            Some(Value::String(s)) if s.trim().is_empty() => {
                f.fail("command", "must not be empty");
                None
            }
            Some(Value::String(s)) if s.contains('\0') => {
                f.fail("command", "must not contain a NUL character");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                f.fail("command", "must be a string");
                None
            }
        };
        let argv = match f.get("argv") {
            None => None,
            Some(Value::Array(a)) if !a.is_empty() => {
                let mut out = Vec::new();
                for (i, x) in a.iter().enumerate() {
                    match x.as_str() {
                        Some(s) if !s.contains('\0') => out.push(s.to_string()),
                        _ => f.fail(&format!("argv[{i}]"), "must be a string without NUL"),
                    }
                }
                Some(out)
            }
            Some(_) => {
                f.fail("argv", "must be a non-empty list of strings");
                None
            }
        };
        let cwd = f.string("cwd", false, 4096);
        if let Some(c) = &cwd {
            if !c.starts_with('/') {
                f.fail("cwd", "must be an absolute path");
            }
        }
        let envs = f.env_map("envs");
        let timeout = f.int("timeout", 1, 3600).unwrap_or(60);
        let argv = match (command, argv) {
            (Some(c), None) => vec!["/bin/sh".to_string(), "-c".to_string(), c],
            (None, Some(a)) => a,
            (Some(_), Some(_)) => {
                f.fail("argv", "give either command or argv, not both");
                Vec::new()
            }
            (None, None) => {
                if f.get("command").is_none() && f.get("argv").is_none() {
                    f.fail("command", "is required (or argv)");
                }
                Vec::new()
            }
        };
        f.finish()?;
        Ok(Self {
            argv,
            cwd,
            envs,
            timeout_secs: timeout as u64,
        })
    }
}

/// `PUT /v1/sandbox/{id}/network_policy`: the policy itself, or wrapped as
/// `{"network_policy": {...}}`.
pub fn parse_policy_update(v: &Value) -> Result<NetworkPolicy, Vec<FieldError>> {
    let inner = match v.as_object() {
        Some(m) if m.len() == 1 && m.contains_key("network_policy") => &m["network_policy"],
        _ => v,
    };
    NetworkPolicy::from_json(inner, "network_policy")
}

/// Query parameters of the list endpoints.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// 1-based page.
    pub page: usize,
    /// Page size, 1..100.
    pub page_size: usize,
    /// Sort field.
    pub sort: String,
    /// Ascending?
    pub asc: bool,
    /// State filter (sandboxes) or name substring (snapshots).
    pub filter: Option<String>,
}

impl ListQuery {
    /// Parses `page`, `page-size`, `sort`, `order-by` and `filter_key`.
    pub fn parse(
        query: Option<&str>,
        sorts: &[&str],
        filter_key: &str,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut q = Self {
            page: 1,
            page_size: 20,
            sort: "created_at".into(),
            asc: false,
            filter: None,
        };
        let mut seen = HashSet::new();
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            if !seen.insert(k.to_string()) {
                errors.push(err(k, "is given more than once"));
                continue;
            }
            match k {
                "page" => match v.parse::<usize>() {
                    Ok(n) if (1..=1_000_000).contains(&n) => q.page = n,
                    _ => errors.push(err("page", "must be an integer of at least 1")),
                },
                "page-size" | "page_size" => match v.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => q.page_size = n,
                    _ => errors.push(err("page-size", "must be an integer between 1 and 100")),
                },
                "sort" => {
                    if sorts.contains(&v.as_str()) {
                        q.sort = v;
                    } else {
                        errors.push(err("sort", &format!("must be one of {}", sorts.join(", "))));
                    }
                }
                "order-by" | "order_by" => match v.as_str() {
                    "asc" => q.asc = true,
                    "desc" => q.asc = false,
                    _ => errors.push(err("order-by", "must be asc or desc")),
                },
                k if k == filter_key => {
                    if !v.is_empty() {
                        q.filter = Some(v);
                    }
                }
                other => errors.push(err(other, "is not a known query parameter")),
            }
        }
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }
}

/// Query of `GET /v1/sandbox/{id}/network/events`.
#[derive(Debug, Clone)]
pub struct EventsQuery {
    /// Only events with a larger sequence number.
    pub after: u64,
    /// At most this many (the newest), 1..=1000.
    pub limit: usize,
}

impl EventsQuery {
    /// Parses `after` and `limit`.
    pub fn parse(query: Option<&str>) -> Result<Self, Vec<FieldError>> {
        let mut q = Self {
            after: 0,
            limit: 100,
        };
        let mut errors = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "after" => match v.parse::<u64>() {
                    Ok(n) => q.after = n,
                    Err(_) => errors.push(err("after", "must be a non-negative integer")),
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=1000).contains(&n) => q.limit = n,
                    _ => errors.push(err("limit", "must be an integer between 1 and 1000")),
                },
                other => errors.push(err(other, "is not a known query parameter")),
            }
        }
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;

/// Whether `s` is safe as one file-name component (a sandbox id or a
/// namespace name under a directory tollgate owns): 1 to `max_len` bytes of
/// ASCII letters, digits, `-`, `_` and `.`, and neither `.` nor `..`.
pub fn is_path_component(s: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
