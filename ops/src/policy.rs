//! The customer's `policy.toml`: which permission phases are open, which need an
//! approval, which Unix user runs them, how commands are classified, and what is never
//! run at all.
//!
//! ```toml
//! allow_same_uid = false          # true only where the agent cannot switch users
//! [limits]
//! clock_skew = "60s"              # at most 5 min
//! max_approval_validity = "1h"    # at most 24 h
//! allow_shell = false
//! max_break_glass_duration = "1h" # at most 24 h; caps every tunnel session
//! teardown_on_disconnect_after = "2m"
//! max_tunnel_sessions = 4
//! max_connections = 8             # per tunnel session
//!
//! [phases.observe]
//! enabled = true
//! approval = "none"
//! run_as = "tether-observe"
//! [phases.operate]
//! enabled = true
//! approval = "required"
//! run_as = "tether-ops"
//! enabled_until = "2026-12-01T18:00:00Z"   # optional
//!
//! [[classify]]                    # first match wins; unmatched is operate
//! argv = ["systemctl", "status", "*"]
//! phase = "observe"
//!
//! [[deny]]                        # before everything; beats any approval
//! program = ["rm", "dd", "mkfs*"]
//! [[deny]]
//! any_arg = ["/etc/tether-agent/**"]
//!
//! [[resource]]                    # break glass (design §3.1): what a tunnel may reach
//! name = "orders-db"
//! target = "10.0.3.7:5432"        # host:port, [v6addr]:port
//! phase = "operate"               # default; must be open and need approvals
//! [resource.privilege.readonly]   # mint and revoke are optional
//! mint = { argv = ["/opt/acme/bin/mint-db-user", "--ro", "--ttl", "{duration_s}"], deadline_ms = 20000 }
//! revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }
//! ```
//!
//! Evaluation (design §2.2): deny → classify → phase open → approval needed. Rules
//! match the **resolved, canonical program path** the agent will execute (so matching
//! and execution cannot disagree): a pattern with a `/` matches the whole path, one
//! without matches its file name. Each other element of a rule's `argv` is a glob for
//! one argument; an element that is exactly `**` matches any number of arguments. A
//! phase without a table is disabled. A shell command is never `observe` and is refused
//! unless `allow_shell`; deny rules cannot see inside a shell string.
//!
//! Break-glass resources are declared here and only here: the vendor names a resource
//! and a privilege, and the target and the credential commands the customer signs come
//! from this file ([`crate::tunnel`]). A tunnel always needs an approval, so its phase
//! must be open with `approval = "required"`.

use std::collections::BTreeMap;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::tunnel::CredentialCommand;
use crate::{parse_rfc3339_ms, sha256_hex, CommandFailure, Phase, Refusal};

/// The longest `policy.toml` read.
pub const MAX_FILE_LEN: usize = 256 * 1024;
/// [`Limits::clock_skew`] default and ceiling.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(60);
/// The largest clock skew a policy may allow.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// [`Limits::max_approval_validity`] default.
pub const DEFAULT_MAX_VALIDITY: Duration = Duration::from_secs(3600);
/// The longest approval window a policy may allow.
pub const MAX_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// [`Limits::max_break_glass_duration`] default.
pub const DEFAULT_MAX_BREAK_GLASS: Duration = Duration::from_secs(3600);
/// The longest break-glass session a policy may allow.
pub const MAX_BREAK_GLASS: Duration = Duration::from_secs(24 * 3600);
/// [`Limits::teardown_on_disconnect_after`] default.
pub const DEFAULT_TEARDOWN_AFTER: Duration = Duration::from_secs(120);
/// The longest a session may outlive the appliance's broker connection.
pub const MAX_TEARDOWN_AFTER: Duration = Duration::from_secs(3600);
/// [`Limits::max_tunnel_sessions`] default.
pub const DEFAULT_MAX_TUNNEL_SESSIONS: u32 = 4;
/// The most tunnel sessions a policy may allow at once.
pub const MAX_TUNNEL_SESSIONS: u32 = 256;
/// [`Limits::max_connections`] default.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// The most connections per session a policy may allow.
pub const MAX_CONNECTIONS: u32 = 1024;
/// The longest resource or privilege name.
pub const MAX_NAME_LEN: usize = 64;
/// The longest `target` (a 253-byte DNS name, `:` and a port).
pub const MAX_TARGET_LEN: usize = 261;
/// The most arguments of a mint or revoke command.
pub const MAX_CREDENTIAL_ARGS: usize = 64;
/// The most bytes of all arguments of a mint or revoke command (the approval the
/// customer signs carries both, and stays under 16 KiB).
pub const MAX_CREDENTIAL_ARGV_BYTES: usize = 2048;
/// The longest `deadline_ms` of a mint or revoke command (10 min).
pub const MAX_CREDENTIAL_DEADLINE_MS: u64 = 600_000;

/// Whether a phase needs a customer approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    /// Runs without one.
    None,
    /// Needs one per command.
    Required,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    allow_same_uid: bool,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    phases: PhasesFile,
    #[serde(default)]
    classify: Vec<ClassifyFile>,
    #[serde(default)]
    deny: Vec<DenyFile>,
    #[serde(default)]
    resource: Vec<ResourceFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default, with = "humantime_serde")]
    clock_skew: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_approval_validity: Option<Duration>,
    #[serde(default)]
    allow_shell: bool,
    #[serde(default, with = "humantime_serde")]
    max_break_glass_duration: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    teardown_on_disconnect_after: Option<Duration>,
    #[serde(default)]
    max_tunnel_sessions: Option<u32>,
    #[serde(default)]
    max_connections: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PhasesFile {
    observe: Option<PhaseFile>,
    deploy: Option<PhaseFile>,
    operate: Option<PhaseFile>,
    install: Option<PhaseFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseFile {
    enabled: bool,
    approval: ApprovalMode,
    run_as: String,
    #[serde(default)]
    enabled_until: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyFile {
    argv: Vec<String>,
    phase: Phase,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyFile {
    #[serde(default)]
    program: Vec<String>,
    #[serde(default)]
    any_arg: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceFile {
    name: String,
    target: String,
    #[serde(default)]
    phase: Option<Phase>,
    #[serde(default)]
    privilege: BTreeMap<String, PrivilegeFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivilegeFile {
    #[serde(default)]
    mint: Option<CredentialCommand>,
    #[serde(default)]
    revoke: Option<CredentialCommand>,
}

/// The limits of approvals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How far the agent's clock may be off an approval's window.
    pub clock_skew: Duration,
    /// The longest window an approval may have.
    pub max_approval_validity: Duration,
    /// Whether shell commands may run at all.
    pub allow_shell: bool,
    /// The longest a break-glass session lasts from activation, whatever its approval
    /// says (default [`DEFAULT_MAX_BREAK_GLASS`], at most [`MAX_BREAK_GLASS`]).
    pub max_break_glass_duration: Duration,
    /// How long a session survives without a broker connection before the agent ends it
    /// (default [`DEFAULT_TEARDOWN_AFTER`], at most [`MAX_TEARDOWN_AFTER`]).
    pub teardown_on_disconnect_after: Duration,
    /// The most break-glass sessions active at once (default
    /// [`DEFAULT_MAX_TUNNEL_SESSIONS`], 1 to [`MAX_TUNNEL_SESSIONS`]).
    pub max_tunnel_sessions: u32,
    /// The most connections a session may ask for (default [`DEFAULT_MAX_CONNECTIONS`],
    /// 1 to [`MAX_CONNECTIONS`]).
    pub max_connections: u32,
}

/// One phase's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseRule {
    /// Open or closed.
    pub enabled: bool,
    /// Whether it needs an approval.
    pub approval: ApprovalMode,
    /// The Unix user its commands run as.
    pub run_as: String,
    /// Closed from this time on (ms since the epoch), if set.
    pub enabled_until_ms: Option<i64>,
}

/// A break-glass resource the customer declared (`[[resource]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Its name, as the vendor requests it.
    pub name: String,
    /// Where its tunnel goes.
    pub target: Target,
    /// The phase its sessions belong to (default operate).
    pub phase: Phase,
    /// Its privileges by name (`[resource.privilege.<name>]`).
    pub privileges: BTreeMap<String, Privilege>,
}

/// One privilege of a resource: how its ephemeral credential is made and removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privilege {
    /// The command whose stdout is the credential, if any.
    pub mint: Option<CredentialCommand>,
    /// The command that removes it at teardown (idempotent), if any.
    pub revoke: Option<CredentialCommand>,
}

/// A tunnel target: `host:port`, or `[v6addr]:port`. Checked for form only; resolving
/// it is the agent's job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    text: String,
    host: String,
    port: u16,
}

impl Target {
    /// Parse `host:port` (a DNS name or IPv4 address) or `[v6addr]:port`; the port is
    /// 1 to 65535.
    pub fn parse(text: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("target {text:?} {why}");
        if text.len() > MAX_TARGET_LEN {
            return Err(bad(&format!("is longer than {MAX_TARGET_LEN} bytes")));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (addr, port) = rest
                .split_once("]:")
                .ok_or_else(|| bad("is not [address]:port"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("has no IPv6 address between [ and ]"))?;
            (addr, port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| bad("is not host:port"))?;
            if host.contains(':') {
                return Err(bad("has an IPv6 address without [ ]"));
            }
            if !valid_host(host) {
                return Err(bad("has no valid host name (labels of letters, digits, - and _, at most 253 bytes)"));
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(bad("has no port between 1 and 65535")),
        };
        Ok(Target {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// As written (what the approval carries).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host: a DNS name, an IPv4 address, or an IPv6 address without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A DNS name or IPv4 address: 1 to 253 bytes of labels (1 to 63 letters, digits, `-`
/// and `_`, not starting or ending with `-`) separated by dots.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether `name` is a resource or privilege name: 1 to [`MAX_NAME_LEN`] of
/// `[a-z0-9_-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The rules of a mint or revoke command (in the policy and in an approval): 1 to
/// [`MAX_CREDENTIAL_ARGS`] arguments, a program, no control characters, at most
/// [`MAX_CREDENTIAL_ARGV_BYTES`] in all, a deadline of 1 ms to
/// [`MAX_CREDENTIAL_DEADLINE_MS`].
pub fn check_credential_command(c: &CredentialCommand) -> Result<(), String> {
    if c.argv.is_empty() || c.argv.len() > MAX_CREDENTIAL_ARGS {
        return Err(format!(
            "argv must have 1 to {MAX_CREDENTIAL_ARGS} arguments"
        ));
    }
    if c.argv[0].is_empty() {
        return Err("argv[0] must name a program".into());
    }
    if c.argv.iter().any(|a| a.chars().any(char::is_control)) {
        return Err("argv must not contain control characters".into());
    }
    if c.argv.iter().map(String::len).sum::<usize>() > MAX_CREDENTIAL_ARGV_BYTES {
        return Err(format!(
            "argv is longer than {MAX_CREDENTIAL_ARGV_BYTES} bytes in all"
        ));
    }
    if !(1..=MAX_CREDENTIAL_DEADLINE_MS).contains(&c.deadline_ms) {
        return Err(format!(
            "deadline_ms must be 1 to {MAX_CREDENTIAL_DEADLINE_MS}"
        ));
    }
    Ok(())
}

/// A program or argument pattern: matched against the full path when it has a `/`, else
/// against the file name (for programs) or the whole argument.
#[derive(Clone, Debug)]
struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    fn new(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("an empty pattern".into());
        }
        let matcher = Glob::new(text)
            .map_err(|e| format!("pattern {text:?}: {e}"))?
            .compile_matcher();
        Ok(Pattern {
            text: text.to_owned(),
            matcher,
        })
    }

    /// For a program: the whole canonical path if the pattern has a `/`, else its file
    /// name.
    fn matches_program(&self, path: &str) -> bool {
        if self.text.contains('/') {
            self.matcher.is_match(path)
        } else {
            self.matcher
                .is_match(path.rsplit('/').next().unwrap_or(path))
        }
    }

    /// For an argument: the argument as given or, if it names a path, with `.` and `..`
    /// resolved lexically (so `/etc/x/../tether-agent/k` still meets `/etc/tether-agent/**`).
    fn matches_arg(&self, arg: &str) -> bool {
        self.matcher.is_match(arg) || (arg.contains('/') && self.matcher.is_match(normalize(arg)))
    }
}

/// `.` and `..` removed lexically from a path.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// One element of a classification rule's `argv`.
#[derive(Clone, Debug)]
enum ArgPattern {
    /// `**`: any number of arguments.
    Any,
    One(Pattern),
}

#[derive(Clone, Debug)]
struct Classify {
    program: Pattern,
    args: Vec<ArgPattern>,
    phase: Phase,
}

#[derive(Clone, Debug)]
struct Deny {
    program: Vec<Pattern>,
    any_arg: Vec<Pattern>,
}

/// A parsed, compiled `policy.toml`.
#[derive(Clone, Debug)]
pub struct Policy {
    /// SHA-256 (hex) of the file's bytes: which policy decided, in manifests and `Status`.
    pub sha256: String,
    /// The file's `version` (1 if absent).
    pub version: u32,
    /// The customer accepts that commands run as the agent's own user.
    pub allow_same_uid: bool,
    /// Approval limits.
    pub limits: Limits,
    phases: [Option<PhaseRule>; 4],
    classify: Vec<Classify>,
    deny: Vec<Deny>,
    resources: Vec<Resource>,
}

/// A command as the agent is about to run it.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    /// Whether it is a shell command.
    pub shell: bool,
    /// The arguments as received (`argv[0]` as the vendor named the program).
    pub argv: &'a [String],
    /// The resolved, canonical path of the program that would run.
    pub program: &'a str,
}

/// What the policy decided for a command that may run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Its phase.
    pub phase: Phase,
    /// Whether it needs a customer approval.
    pub approval_required: bool,
    /// The user it runs as.
    pub run_as: String,
}

impl Policy {
    /// Parse and compile `policy.toml`. Any error refuses the whole file: a broken policy
    /// refuses every command (design §1.7), it never falls back to an older one.
    pub fn parse(bytes: &[u8]) -> Result<Policy, String> {
        if bytes.len() > MAX_FILE_LEN {
            return Err(format!("policy.toml is longer than {MAX_FILE_LEN} bytes"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "policy.toml is not UTF-8".to_owned())?;
        let file: File = toml::from_str(text).map_err(|e| format!("policy.toml: {e}"))?;
        let version = file.version.unwrap_or(1);
        if version != 1 {
            return Err(format!(
                "policy.toml: version {version} is not supported (1 is)"
            ));
        }
        let clock_skew = file.limits.clock_skew.unwrap_or(DEFAULT_SKEW);
        if clock_skew > MAX_SKEW {
            return Err(format!(
                "policy.toml: limits.clock_skew is at most {MAX_SKEW:?}"
            ));
        }
        let max_approval_validity = file
            .limits
            .max_approval_validity
            .unwrap_or(DEFAULT_MAX_VALIDITY);
        if max_approval_validity > MAX_VALIDITY || max_approval_validity.is_zero() {
            return Err(format!(
                "policy.toml: limits.max_approval_validity must be between 1 ms and {MAX_VALIDITY:?}"
            ));
        }
        let max_break_glass_duration = file
            .limits
            .max_break_glass_duration
            .unwrap_or(DEFAULT_MAX_BREAK_GLASS);
        if max_break_glass_duration > MAX_BREAK_GLASS
            || max_break_glass_duration < Duration::from_secs(1)
        {
            return Err(format!(
                "policy.toml: limits.max_break_glass_duration must be between 1 s and {MAX_BREAK_GLASS:?}"
            ));
        }
        let teardown_on_disconnect_after = file
            .limits
            .teardown_on_disconnect_after
            .unwrap_or(DEFAULT_TEARDOWN_AFTER);
        if teardown_on_disconnect_after > MAX_TEARDOWN_AFTER {
            return Err(format!(
                "policy.toml: limits.teardown_on_disconnect_after is at most {MAX_TEARDOWN_AFTER:?}"
            ));
        }
        let max_tunnel_sessions = file
            .limits
            .max_tunnel_sessions
            .unwrap_or(DEFAULT_MAX_TUNNEL_SESSIONS);
        if !(1..=MAX_TUNNEL_SESSIONS).contains(&max_tunnel_sessions) {
            return Err(format!(
                "policy.toml: limits.max_tunnel_sessions must be 1 to {MAX_TUNNEL_SESSIONS}"
            ));
        }
        let max_connections = file
            .limits
            .max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
            return Err(format!(
                "policy.toml: limits.max_connections must be 1 to {MAX_CONNECTIONS}"
            ));
        }
        let phase = |name: &str, p: Option<PhaseFile>| -> Result<Option<PhaseRule>, String> {
            let Some(p) = p else { return Ok(None) };
            if p.run_as.is_empty()
                || p.run_as.len() > 32
                || !p
                    .run_as
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(format!(
                    "policy.toml: phases.{name}.run_as {:?} is not a user name",
                    p.run_as
                ));
            }
            let enabled_until_ms = p
                .enabled_until
                .as_deref()
                .map(parse_rfc3339_ms)
                .transpose()
                .map_err(|e| format!("policy.toml: phases.{name}.enabled_until: {e}"))?;
            Ok(Some(PhaseRule {
                enabled: p.enabled,
                approval: p.approval,
                run_as: p.run_as,
                enabled_until_ms,
            }))
        };
        let phases = [
            phase("observe", file.phases.observe)?,
            phase("deploy", file.phases.deploy)?,
            phase("operate", file.phases.operate)?,
            phase("install", file.phases.install)?,
        ];
        let mut classify = Vec::with_capacity(file.classify.len());
        for (i, c) in file.classify.into_iter().enumerate() {
            let at = |e: String| format!("policy.toml: classify[{i}]: {e}");
            let (first, rest) = c
                .argv
                .split_first()
                .ok_or_else(|| at("argv is empty".into()))?;
            if first == "**" {
                return Err(at("argv[0] names the program; it cannot be **".into()));
            }
            let program = Pattern::new(first).map_err(at)?;
            let args = rest
                .iter()
                .map(|a| {
                    if a == "**" {
                        Ok(ArgPattern::Any)
                    } else {
                        Pattern::new(a).map(ArgPattern::One)
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            classify.push(Classify {
                program,
                args,
                phase: c.phase,
            });
        }
        let mut deny = Vec::with_capacity(file.deny.len());
        for (i, d) in file.deny.into_iter().enumerate() {
            let at = |e: String| format!("policy.toml: deny[{i}]: {e}");
            if d.program.is_empty() && d.any_arg.is_empty() {
                return Err(at("a deny rule needs program or any_arg".into()));
            }
            deny.push(Deny {
                program: d
                    .program
                    .iter()
                    .map(|p| Pattern::new(p))
                    .collect::<Result<_, _>>()
                    .map_err(at)?,
                any_arg: d
                    .any_arg
                    .iter()
                    .map(|p| Pattern::new(p))
                    .collect::<Result<_, _>>()
                    .map_err(at)?,
            });
        }
        let mut resources: Vec<Resource> = Vec::with_capacity(file.resource.len());
        for (i, r) in file.resource.into_iter().enumerate() {
            let at = |e: &str| format!("policy.toml: resource[{i}] {:?}: {e}", r.name);
            if !valid_name(&r.name) {
                return Err(at(&format!(
                    "name must be 1 to {MAX_NAME_LEN} of a-z, 0-9, _ and -"
                )));
            }
            if resources.iter().any(|other| other.name == r.name) {
                return Err(at("the name appears twice"));
            }
            let target = Target::parse(&r.target).map_err(|e| at(&e))?;
            if r.privilege.is_empty() {
                return Err(at(
                    "a resource needs at least one [resource.privilege.<name>]",
                ));
            }
            let mut privileges = BTreeMap::new();
            for (name, p) in r.privilege {
                if !valid_name(&name) {
                    return Err(at(&format!(
                        "privilege {name:?}: the name must be 1 to {MAX_NAME_LEN} of a-z, 0-9, _ and -"
                    )));
                }
                for (what, c) in [("mint", &p.mint), ("revoke", &p.revoke)] {
                    if let Some(c) = c {
                        check_credential_command(c)
                            .map_err(|e| at(&format!("privilege {name:?}: {what}: {e}")))?;
                    }
                }
                privileges.insert(
                    name,
                    Privilege {
                        mint: p.mint,
                        revoke: p.revoke,
                    },
                );
            }
            resources.push(Resource {
                name: r.name,
                target,
                phase: r.phase.unwrap_or(Phase::Operate),
                privileges,
            });
        }
        Ok(Policy {
            sha256: sha256_hex(bytes),
            version,
            allow_same_uid: file.allow_same_uid,
            limits: Limits {
                clock_skew,
                max_approval_validity,
                allow_shell: file.limits.allow_shell,
                max_break_glass_duration,
                teardown_on_disconnect_after,
                max_tunnel_sessions,
                max_connections,
            },
            phases,
            classify,
            deny,
            resources,
        })
    }

    /// The rule of `phase`, `None` if the policy has no table for it (disabled).
    pub fn phase(&self, phase: Phase) -> Option<&PhaseRule> {
        self.phases[phase as usize].as_ref()
    }

    /// The break-glass resources, in file order.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// The break-glass resource called `name`.
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// Whether `phase` is open at `now_ms`.
    pub fn is_open(&self, phase: Phase, now_ms: i64) -> bool {
        self.phase(phase)
            .is_some_and(|r| r.enabled && r.enabled_until_ms.is_none_or(|until| now_ms < until))
    }

    /// The first deny rule `cmd` meets, as text for the refusal.
    pub fn denied(&self, cmd: &Command<'_>) -> Option<String> {
        for d in &self.deny {
            if let Some(p) = d.program.iter().find(|p| p.matches_program(cmd.program)) {
                return Some(format!("{} matches deny program {:?}", cmd.program, p.text));
            }
            for arg in cmd.argv.iter().skip(1) {
                if let Some(p) = d.any_arg.iter().find(|p| p.matches_arg(arg)) {
                    return Some(format!(
                        "argument {arg:?} matches deny any_arg {:?}",
                        p.text
                    ));
                }
            }
        }
        None
    }

    /// The phase `cmd` falls in: the first matching rule's, else operate; never observe
    /// for a shell command.
    pub fn classify(&self, cmd: &Command<'_>) -> Phase {
        let phase = self
            .classify
            .iter()
            .find(|c| {
                c.program.matches_program(cmd.program)
                    && args_match(&c.args, cmd.argv.get(1..).unwrap_or(&[]))
            })
            .map_or(Phase::Operate, |c| c.phase);
        if cmd.shell && phase == Phase::Observe {
            Phase::Operate
        } else {
            phase
        }
    }

    /// Deny → classify → phase open: whether `cmd` may run at `now_ms`, in which phase,
    /// as whom, and whether it needs an approval.
    pub fn evaluate(&self, cmd: &Command<'_>, now_ms: i64) -> Result<Decision, Refusal> {
        if let Some(why) = self.denied(cmd) {
            return Err(Refusal::new(CommandFailure::DeniedByPolicy, why));
        }
        if cmd.shell && !self.limits.allow_shell {
            return Err(Refusal::new(
                CommandFailure::ShellNotAllowed,
                "the customer policy does not allow shell commands (limits.allow_shell)",
            ));
        }
        let phase = self.classify(cmd);
        let rule = match self.phase(phase) {
            Some(rule) if self.is_open(phase, now_ms) => rule,
            _ => {
                return Err(Refusal::new(
                    CommandFailure::PhaseDisabled,
                    format!("the customer policy has phase {phase} disabled"),
                ))
            }
        };
        Ok(Decision {
            phase,
            approval_required: rule.approval == ApprovalMode::Required,
            run_as: rule.run_as.clone(),
        })
    }

    /// One line per phase for `Status`: `observe=on/none,deploy=on/required,operate=on/required/until=…,install=off`.
    pub fn phases_summary(&self) -> String {
        Phase::ALL
            .iter()
            .map(|&p| match self.phase(p) {
                Some(r) if r.enabled => {
                    let mode = match r.approval {
                        ApprovalMode::None => "none",
                        ApprovalMode::Required => "required",
                    };
                    match r.enabled_until_ms {
                        Some(u) => format!("{p}=on/{mode}/until={}", crate::format_rfc3339_ms(u)),
                        None => format!("{p}=on/{mode}"),
                    }
                }
                _ => format!("{p}=off"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether `args` meet `patterns` (`**` takes any number of arguments).
fn args_match(patterns: &[ArgPattern], args: &[String]) -> bool {
    match patterns.split_first() {
        None => args.is_empty(),
        Some((ArgPattern::Any, rest)) => {
            (0..=args.len()).any(|skip| args_match(rest, &args[skip..]))
        }
        Some((ArgPattern::One(p), rest)) => match args.split_first() {
            Some((a, tail)) => p.matcher.is_match(a) && args_match(rest, tail),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[phases.observe]
enabled = true
approval = "none"
run_as = "tether-observe"
[phases.operate]
enabled = true
approval = "required"
run_as = "tether-ops"
[phases.install]
enabled = false
approval = "required"
run_as = "tether-install"

[[classify]]
argv = ["systemctl", "status", "*"]
phase = "observe"
[[classify]]
argv = ["journalctl", "**"]
phase = "observe"
[[classify]]
argv = ["apt-get", "install", "**"]
phase = "install"

[[deny]]
program = ["rm", "mkfs*"]
[[deny]]
any_arg = ["/etc/tether-agent/**"]
"#;

    fn cmd<'a>(argv: &'a [String], program: &'a str) -> Command<'a> {
        Command {
            shell: false,
            argv,
            program,
        }
    }

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn classify_deny_and_phases() {
        let p = Policy::parse(POLICY.as_bytes()).unwrap();
        let now = 0;
        let d = p
            .evaluate(
                &cmd(&v(&["systemctl", "status", "x"]), "/usr/bin/systemctl"),
                now,
            )
            .unwrap();
        assert_eq!(
            (d.phase, d.approval_required, d.run_as.as_str()),
            (Phase::Observe, false, "tether-observe")
        );
        // One more argument than the rule has: not observe.
        let d = p
            .evaluate(
                &cmd(&v(&["systemctl", "status", "x", "y"]), "/usr/bin/systemctl"),
                now,
            )
            .unwrap();
        assert_eq!(d.phase, Phase::Operate);
        assert!(d.approval_required);
        let d = p
            .evaluate(&cmd(&v(&["journalctl"]), "/usr/bin/journalctl"), now)
            .unwrap();
        assert_eq!(d.phase, Phase::Observe);
        let d = p
            .evaluate(
                &cmd(
                    &v(&["journalctl", "-u", "x", "-n", "5"]),
                    "/usr/bin/journalctl",
                ),
                now,
            )
            .unwrap();
        assert_eq!(d.phase, Phase::Observe);
        // Install is disabled.
        let r = p
            .evaluate(
                &cmd(&v(&["apt-get", "install", "x"]), "/usr/bin/apt-get"),
                now,
            )
            .unwrap_err();
        assert_eq!(r.code, CommandFailure::PhaseDisabled);
        // Deny by the resolved path's file name, whatever argv[0] said.
        let r = p
            .evaluate(
                &cmd(&v(&["/usr/bin/../bin/rm", "-rf", "/"]), "/usr/bin/rm"),
                now,
            )
            .unwrap_err();
        assert_eq!(r.code, CommandFailure::DeniedByPolicy);
        let r = p
            .evaluate(
                &cmd(&v(&["cat", "/etc/x/../tether-agent/k"]), "/usr/bin/cat"),
                now,
            )
            .unwrap_err();
        assert_eq!(r.code, CommandFailure::DeniedByPolicy);
        // A shell command is never observe, and needs allow_shell.
        let sh = Command {
            shell: true,
            argv: &v(&["systemctl", "status", "x"]),
            program: "/usr/bin/systemctl",
        };
        assert_eq!(p.classify(&sh), Phase::Operate);
        assert_eq!(
            p.evaluate(&sh, now).unwrap_err().code,
            CommandFailure::ShellNotAllowed
        );
        assert_eq!(
            p.phases_summary(),
            "observe=on/none,deploy=off,operate=on/required,install=off"
        );
    }

    #[test]
    fn enabled_until_closes_the_phase() {
        let text = POLICY.replace(
            "run_as = \"tether-ops\"",
            "run_as = \"tether-ops\"\nenabled_until = \"2026-12-01T18:00:00Z\"",
        );
        let p = Policy::parse(text.as_bytes()).unwrap();
        let until = parse_rfc3339_ms("2026-12-01T18:00:00Z").unwrap();
        assert!(p.is_open(Phase::Operate, until - 1));
        assert!(!p.is_open(Phase::Operate, until));
    }

    #[test]
    fn broken_policies_are_refused_whole() {
        for bad in [
            "[phases.observe]\nenabled = true\napproval = \"maybe\"\nrun_as = \"x\"\n",
            "[phases.observe]\nenabled = true\napproval = \"none\"\n",
            "[phases.observe]\nenabled = true\napproval = \"none\"\nrun_as = \"a b\"\n",
            "[[deny]]\n",
            "[[classify]]\nargv = []\nphase = \"observe\"\n",
            "[[classify]]\nargv = [\"**\"]\nphase = \"observe\"\n",
            "[[classify]]\nargv = [\"a\"]\nphase = \"root\"\n",
            "unknown = 1\n",
            "version = 2\n",
            "[limits]\nclock_skew = \"10m\"\n",
            "[limits]\nmax_approval_validity = \"2d\"\n",
        ] {
            assert!(Policy::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let empty = Policy::parse(b"").unwrap();
        assert!(!empty.is_open(Phase::Observe, 0));
    }

    const RESOURCES: &str = r#"
[limits]
max_break_glass_duration = "4h"
teardown_on_disconnect_after = "5m"
max_tunnel_sessions = 2
max_connections = 3

[[resource]]
name = "orders-db"
target = "10.0.3.7:5432"
[resource.privilege.readonly]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--ro", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }
[resource.privilege.plain]

[[resource]]
name = "k8s_api-2"
target = "[fd00::1]:6443"
phase = "install"
[resource.privilege.admin]
revoke = { argv = ["kubectl", "delete", "secret", "x"], deadline_ms = 1 }

[[resource]]
name = "web"
target = "internal.acme.example:443"
[resource.privilege.ro]
"#;

    #[test]
    fn break_glass_resources_and_limits_parse() {
        let p = Policy::parse(RESOURCES.as_bytes()).unwrap();
        let l = &p.limits;
        assert_eq!(l.max_break_glass_duration, Duration::from_secs(4 * 3600));
        assert_eq!(l.teardown_on_disconnect_after, Duration::from_secs(300));
        assert_eq!((l.max_tunnel_sessions, l.max_connections), (2, 3));
        assert_eq!(p.resources().len(), 3);
        let db = p.resource("orders-db").unwrap();
        assert_eq!(db.phase, Phase::Operate, "operate by default");
        assert_eq!(
            (db.target.as_str(), db.target.host(), db.target.port()),
            ("10.0.3.7:5432", "10.0.3.7", 5432)
        );
        let ro = &db.privileges["readonly"];
        assert_eq!(
            ro.mint.as_ref().unwrap().argv,
            [
                "/opt/acme/bin/mint-db-user",
                "--ro",
                "--ttl",
                "{duration_s}"
            ]
        );
        assert_eq!(ro.revoke.as_ref().unwrap().deadline_ms, 20_000);
        assert_eq!(
            db.privileges["plain"],
            Privilege {
                mint: None,
                revoke: None
            }
        );
        let k8s = p.resource("k8s_api-2").unwrap();
        assert_eq!(k8s.phase, Phase::Install);
        assert_eq!((k8s.target.host(), k8s.target.port()), ("fd00::1", 6443));
        assert!(k8s.privileges["admin"].mint.is_none());
        assert_eq!(
            p.resource("web").unwrap().target.host(),
            "internal.acme.example"
        );
        assert!(p.resource("Orders-db").is_none());
        // The defaults.
        let l = Policy::parse(b"").unwrap().limits;
        assert_eq!(l.max_break_glass_duration, DEFAULT_MAX_BREAK_GLASS);
        assert_eq!(l.teardown_on_disconnect_after, DEFAULT_TEARDOWN_AFTER);
        assert_eq!(
            (l.max_tunnel_sessions, l.max_connections),
            (DEFAULT_MAX_TUNNEL_SESSIONS, DEFAULT_MAX_CONNECTIONS)
        );
    }

    #[test]
    fn targets_are_host_and_port() {
        for good in [
            "db:1",
            "10.0.3.7:65535",
            "a-b.c_d.example:5432",
            "[::1]:22",
            "[2001:db8::7]:443",
        ] {
            Target::parse(good).unwrap();
        }
        let long_host = format!("{}:80", vec!["a".repeat(63); 4].join("."));
        for bad in [
            "",
            "db",
            "db:",
            ":5432",
            "db:0",
            "db:65536",
            "db:+80",
            "db:80x",
            "db: 80",
            "::1:22",
            "2001:db8::7:443",
            "[::1]22",
            "[db]:22",
            "[::1]:0",
            "-db:80",
            "db-.x:80",
            "a..b:80",
            "db.:80",
            "d b:80",
            "db/x:80",
            "db\n:80",
            "é:80",
            &long_host,
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn broken_break_glass_declarations_are_refused_whole() {
        let res = |body: &str| format!("[[resource]]\n{body}");
        let ok_priv = "[resource.privilege.ro]\n";
        for bad in [
            // Names.
            res(&format!("name = \"\"\ntarget = \"db:1\"\n{ok_priv}")),
            res(&format!("name = \"Orders\"\ntarget = \"db:1\"\n{ok_priv}")),
            res(&format!("name = \"a b\"\ntarget = \"db:1\"\n{ok_priv}")),
            res(&format!("name = \"a.b\"\ntarget = \"db:1\"\n{ok_priv}")),
            res(&format!(
                "name = \"{}\"\ntarget = \"db:1\"\n{ok_priv}",
                "a".repeat(65)
            )),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.\"Read Only\"]\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.\"\"]\n"),
            // Targets.
            res(&format!("name = \"db\"\ntarget = \"db\"\n{ok_priv}")),
            res(&format!("name = \"db\"\ntarget = \"db:0\"\n{ok_priv}")),
            res(&format!("name = \"db\"\ntarget = \"::1:5432\"\n{ok_priv}")),
            res(&format!("name = \"db\"\n{ok_priv}")),
            // Unknown keys, anywhere.
            res(&format!("name = \"db\"\ntarget = \"db:1\"\nport = 5\n{ok_priv}")),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nexec = 1\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = { argv = [\"x\"], deadline_ms = 1, shell = true }\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = { argv = [\"x\"] }\n"),
            // Bad phases and commands.
            res(&format!("name = \"db\"\ntarget = \"db:1\"\nphase = \"root\"\n{ok_priv}")),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = { argv = [], deadline_ms = 1 }\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = { argv = [\"\"], deadline_ms = 1 }\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = { argv = [\"x\"], deadline_ms = 0 }\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = { argv = [\"x\"], deadline_ms = 600001 }\n"),
            res("name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nrevoke = { argv = [\"x\\ny\"], deadline_ms = 1 }\n"),
            res(&format!(
                "name = \"db\"\ntarget = \"db:1\"\n[resource.privilege.ro]\nmint = {{ argv = [\"{}\"], deadline_ms = 1 }}\n",
                "x".repeat(MAX_CREDENTIAL_ARGV_BYTES + 1)
            )),
            // No privilege at all.
            res("name = \"db\"\ntarget = \"db:1\"\n"),
            // The same resource twice; the same privilege twice.
            format!(
                "{}{}",
                res(&format!("name = \"db\"\ntarget = \"db:1\"\n{ok_priv}")),
                res(&format!("name = \"db\"\ntarget = \"db:2\"\n{ok_priv}"))
            ),
            res(&format!("name = \"db\"\ntarget = \"db:1\"\n{ok_priv}{ok_priv}")),
            // Limits.
            "[limits]\nmax_break_glass_duration = \"25h\"\n".into(),
            "[limits]\nmax_break_glass_duration = \"0s\"\n".into(),
            "[limits]\nmax_break_glass_duration = \"soon\"\n".into(),
            "[limits]\nteardown_on_disconnect_after = \"2h\"\n".into(),
            "[limits]\nmax_tunnel_sessions = 0\n".into(),
            "[limits]\nmax_tunnel_sessions = -1\n".into(),
            "[limits]\nmax_connections = 0\n".into(),
            "[limits]\nmax_connections = 1025\n".into(),
            "[limits]\nmax_tunnels = 1\n".into(),
        ] {
            assert!(Policy::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        Policy::parse(
            res(&format!(
                "name = \"db\"\ntarget = \"db:1\"\n{ok_priv}[limits]\nmax_break_glass_duration = \"24h\"\nteardown_on_disconnect_after = \"0s\"\n"
            ))
            .as_bytes(),
        )
        .unwrap();
    }
}
